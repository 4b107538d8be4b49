// Real mergeflow nodes for the interop tests: each in its own temp data
// dir, on loopback, ports chosen by the OS, stopped (and its dir removed)
// by the test that started it.
import { spawn } from "node:child_process"
import { mkdtempSync, rmSync, writeFileSync } from "node:fs"
import { createServer } from "node:net"
import { tmpdir } from "node:os"
import path from "node:path"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"

const ROOT = path.resolve(import.meta.dirname, "../../..")
export const BIN =
  process.env.MERGEFLOW_BIN ||
  path.join(process.env.CARGO_TARGET_DIR || path.join(ROOT, "target"), "debug", "mergeflow")

const cleanups = new WeakMap()

/**
 * Runs `fn` when test `t` ends, in reverse order of registration (clients
 * before the nodes they talk to: a client whose node goes away first
 * schedules a reconnect that keeps the process alive after the test).
 */
export function onEnd(t, fn) {
  let list = cleanups.get(t)
  if (!list) {
    list = []
    cleanups.set(t, list)
    t.after(async () => {
      while (list.length) await list.pop()()
    })
  }
  list.push(fn)
}

/** Starts a node; `peers` are multiaddrs of nodes to dial, `config` extra TOML. */
export async function startNode(t, { peers = [], config = "" } = {}) {
  const dir = mkdtempSync(path.join(tmpdir(), "mergeflow-interop-"))
  const cfg = path.join(dir, "config.toml")
  writeFileSync(cfg, config)
  const args = ["start", "-c", cfg, "--data-dir", path.join(dir, "data"), "--api", "127.0.0.1:0",
    "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--log-format", "text"]
  for (const p of peers) args.push("--peer", p)
  const child = spawn(BIN, args, { stdio: ["ignore", "pipe", "pipe"] })
  let out = ""
  let err = ""
  const node = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`node did not start within 30 s:\n${out}\n${err}`)), 30_000)
    let api = null
    let peerId = null
    let addr = null
    const check = () => {
      if (api && addr) {
        clearTimeout(timer)
        resolve({ api, peerId, addr })
      }
    }
    child.stdout.on("data", (d) => {
      out += d
      const m = out.match(/ready: api=(\S+) peer_id=(\S+)/)
      if (m) [api, peerId] = [m[1], m[2]]
      check()
    })
    child.stderr.on("data", (d) => {
      err += d
      const m = err.match(/listening addr=(\/ip4\/127\.0\.0\.1\/tcp\/\d+\/p2p\/\S+)/)
      if (m) addr = m[1]
      check()
    })
    child.on("exit", (code) => reject(new Error(`node exited (${code}) before it was ready:\n${out}\n${err}`)))
  })
  child.removeAllListeners("exit")
  node.log = () => err
  node.stop = async () => {
    if (child.exitCode === null) {
      const exited = new Promise((r) => child.once("exit", r))
      child.kill("SIGTERM")
      await exited
    }
    rmSync(dir, { recursive: true, force: true })
  }
  node.ws = node.api.replace(/^http/, "ws") + "/v1/automerge"
  onEnd(t, node.stop)
  return node
}

/** An HTTP call to a node's API; returns { status, body }. */
export async function http(node, method, p, body, headers = {}) {
  const init = { method, headers: { ...headers } }
  if (body !== undefined) {
    if (typeof body === "string") {
      init.body = body
    } else {
      init.body = JSON.stringify(body)
      init.headers["content-type"] = "application/json"
    }
  }
  const res = await fetch(node.api + p, init)
  const text = await res.text()
  let json = null
  try {
    json = JSON.parse(text)
  } catch {}
  return { status: res.status, body: json ?? text }
}

/** Polls `f` until it returns a truthy value (or `deadline` ms pass). */
export async function until(what, f, deadline = 30_000) {
  const end = Date.now() + deadline
  let last
  for (;;) {
    try {
      last = await f()
      if (last) return last
    } catch (e) {
      last = e
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what} (last: ${last})`)
    await new Promise((r) => setTimeout(r, 50))
  }
}

/** Waits until `a` and `b` see each other as peers. */
export async function connected(a, b) {
  await until(`${a.peerId} and ${b.peerId} connected`, async () => {
    const pa = (await http(a, "GET", "/v1/peers")).body
    const pb = (await http(b, "GET", "/v1/peers")).body
    const has = (list, id) => Array.isArray(list) && list.some((p) => p.peer_id === id && p.connected !== false)
    return has(pa, b.peerId) && has(pb, a.peerId)
  })
}

/** A JS automerge-repo client of `node` (no storage unless given). */
export function client(t, node, { query = "", storage, url } = {}) {
  const adapter = new WebSocketClientAdapter(url ?? node.ws + query)
  const repo = new Repo({ network: [adapter], storage })
  onEnd(t, () => repo.shutdown())
  return repo
}

/** A doc's JSON over HTTP, or null when the node does not have it. */
export async function docJson(node, id) {
  const r = await http(node, "GET", "/v1/docs/" + encodeURIComponent(id))
  return r.status === 200 ? r.body : null
}

/** A loopback port the OS gives out now, for servers that take a port number rather than 0. */
export async function freePort() {
  const srv = createServer()
  await new Promise((r) => srv.listen(0, "127.0.0.1", r))
  const { port } = srv.address()
  await new Promise((r) => srv.close(r))
  return port
}
