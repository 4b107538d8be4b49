#!/usr/bin/env node
// Side-by-side benchmark of automerge-repo JS clients against
//   npm  - the npm sync server (@automerge/automerge-repo-sync-server 0.2.8),
//   one  - one mergeflow node,
//   mesh - two mergeflow nodes in a mesh (writer on node A, reader on node B).
//
// For each target:
//   load  - a seeding client (on A) creates --docs small todo docs (a title
//           and 5 small objects); "seed+store" is the time until the server
//           (for mesh: both nodes) has stored every one with the seeder's
//           heads (npm: its files in DATA_DIR; mergeflow: GET /v1/docs
//           listing, polled). Then a fresh client (new Repo, no storage; on B)
//           finds them all by URL, --batch at a time. Reported: time from the
//           first find to the last one resolving, and the wire bytes (TCP
//           payload: WebSocket frames) both ways, counted by a loopback proxy
//           in front of the fresh client, at that moment and once the
//           connection has gone quiet ("settled"), plus the message kinds.
//   edits - client W (A) and client R (B) have one doc open; W makes edits one
//           after another (d.n = i), R waits for its handle to show n === i
//           before the next one. Latency = W's change call to R's change
//           event. Twice: back to back, and paced (each edit starts --gap ms
//           after the previous one started; automerge-repo throttles outgoing
//           sync per doc to one round per 100 ms, which back-to-back edits hit
//           on every edit). --warmup edits of each are discarded.
//
// Run: cd tests/interop && MERGEFLOW_BIN=../../target/release/mergeflow node bench.mjs
//        [--docs 1000] [--edits 200] [--warmup 20] [--batch 100] [--gap 150]
//        [--targets npm,one,mesh] [--log-dir DIR] [--verbose]
// Prints a table, then one line `BENCH_JSON {...}` with every number.
// Everything runs on loopback with OS-chosen ports; servers, nodes and temp
// dirs are removed at exit, also on failure or Ctrl-C.
import { spawn, execFileSync } from "node:child_process"
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs"
import { createConnection, createServer } from "node:net"
import os from "node:os"
import path from "node:path"
import { performance } from "node:perf_hooks"
import { parseArgs } from "node:util"
import * as A from "@automerge/automerge"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { BIN, freePort, http, until } from "./lib/cluster.mjs"

const HERE = import.meta.dirname
const SYNC_SERVER = path.join(HERE, "node_modules/@automerge/automerge-repo-sync-server/src/index.js")

const { values: opt } = parseArgs({
  options: {
    docs: { type: "string", default: "1000" },
    edits: { type: "string", default: "200" },
    warmup: { type: "string", default: "20" },
    batch: { type: "string", default: "100" },
    gap: { type: "string", default: "150" },
    targets: { type: "string", default: "npm,one,mesh" },
    "log-dir": { type: "string" },
    verbose: { type: "boolean", short: "v" },
    help: { type: "boolean", short: "h" },
  },
})
if (opt.help) {
  const lines = readFileSync(new URL(import.meta.url), "utf8").split("\n").slice(1)
  console.log(lines.slice(0, lines.findIndex((l) => !l.startsWith("//"))).join("\n"))
  process.exit(0)
}
const DOCS = posInt("docs")
const EDITS = posInt("edits")
const WARMUP = posInt("warmup", true)
const BATCH = posInt("batch")
const GAP = posInt("gap", true)
const TARGETS = opt.targets.split(",").map((s) => s.trim()).filter(Boolean)
for (const t of TARGETS) if (!["npm", "one", "mesh"].includes(t)) die(`unknown target ${t} (npm, one, mesh)`)

function posInt(name, zeroOk = false) {
  const n = Number(opt[name])
  if (!Number.isInteger(n) || n < (zeroOk ? 0 : 1)) die(`--${name} must be an integer >= ${zeroOk ? 0 : 1}`)
  return n
}
const T0 = performance.now()
function mark(what) {
  if (opt.verbose) console.log(`   [${((performance.now() - T0) / 1000).toFixed(2)} s] ${what}`)
}
function die(msg) {
  console.error(`bench: ${msg}`)
  process.exit(2)
}

// ---------------------------------------------------------------- cleanup --
// Async cleanups run last-in first-out (clients before their servers); the
// sync `exit` handler is the backstop for children and dirs if they did not.
const cleanups = []
const children = new Set()
const dirs = new Set()
async function runCleanups(downTo = 0) {
  while (cleanups.length > downTo) {
    const fn = cleanups.pop()
    try {
      await fn()
    } catch (e) {
      console.error(`bench: cleanup failed: ${e?.stack ?? e}`)
    }
  }
}
process.on("exit", () => {
  for (const c of children) if (c.pid && c.exitCode === null && c.signalCode === null) c.kill("SIGKILL")
  for (const d of dirs) rmSync(d, { recursive: true, force: true })
})
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.once(sig, () => {
    console.error(`bench: ${sig}, cleaning up`)
    runCleanups().finally(() => process.exit(130))
  })
}
function tempDir(prefix) {
  const d = mkdtempSync(path.join(os.tmpdir(), prefix))
  dirs.add(d)
  cleanups.push(() => {
    rmSync(d, { recursive: true, force: true })
    dirs.delete(d)
  })
  return d
}

/** Spawns `cmd`, keeps its output; `stop()` sends SIGTERM (SIGKILL after 15 s) and waits. */
function spawnKept(name, cmd, args, opts) {
  const child = spawn(cmd, args, { ...opts, stdio: ["ignore", "pipe", "pipe"] })
  children.add(child)
  const proc = { name, child, out: "", exited: false }
  child.stdout.on("data", (d) => (proc.out += d))
  child.stderr.on("data", (d) => (proc.out += d))
  child.on("exit", () => (proc.exited = true))
  child.on("error", (e) => {
    // Spawn failed (no such binary...): no exit event follows.
    proc.out += `\nbench: cannot run ${cmd}: ${e.message}\n`
    proc.exited = true
    child.emit("exit", null, "spawn-error")
  })
  // "close": exited and its output read to the end (its shutdown lines too).
  const closed = new Promise((r) => child.once("close", (code, sig) => r((proc.exit = sig ?? code))))
  proc.stop = async () => {
    if (!proc.exited && child.exitCode === null && child.signalCode === null) {
      proc.stopped = true
      child.kill("SIGTERM")
      const t = setTimeout(() => {
        proc.out += "\nbench: no exit 15 s after SIGTERM, sent SIGKILL\n"
        child.kill("SIGKILL")
      }, 15_000)
      await closed
      clearTimeout(t)
    } else if (child.pid) {
      await closed
    }
    children.delete(child)
  }
  cleanups.push(proc.stop)
  return proc
}

/** Resolves with `f(text)`'s first truthy value as output arrives; rejects on exit or after `ms`. */
function waitOutput(proc, f, ms = 60_000) {
  return new Promise((resolve, reject) => {
    const done = (fn, v) => {
      clearTimeout(timer)
      proc.child.stdout.off("data", check)
      proc.child.stderr.off("data", check)
      proc.child.off("exit", onExit)
      fn(v)
    }
    const check = () => {
      const v = f(proc.out)
      if (v) done(resolve, v)
    }
    const onExit = (code, sig) => done(reject, new Error(`${proc.name} exited (${code ?? sig}):\n${proc.out}`))
    const timer = setTimeout(() => done(reject, new Error(`${proc.name} not ready within ${ms} ms:\n${proc.out}`)), ms)
    proc.child.stdout.on("data", check)
    proc.child.stderr.on("data", check)
    proc.child.on("exit", onExit)
    check()
  })
}

// ---------------------------------------------------------------- servers --
const servers = [] // every server/node started, for the log report


async function startSyncServer() {
  const dir = tempDir("mergeflow-bench-npm-")
  // PORT is not 0-able; a port the OS just gave out, retried if someone took it.
  for (let attempt = 0; ; attempt++) {
    const port = await freePort()
    const proc = spawnKept("npm sync server", process.execPath, [SYNC_SERVER], {
      cwd: dir,
      env: { ...process.env, PORT: String(port), DATA_DIR: path.join(dir, "amrg") },
    })
    try {
      await waitOutput(proc, (o) => o.includes(`Listening on port ${port}`), 30_000)
    } catch (e) {
      await proc.stop()
      if (attempt < 3 && /EADDRINUSE/.test(proc.out)) continue
      throw e
    }
    proc.probes = await servesPeers(proc, `ws://127.0.0.1:${port}`)
    const s = Object.assign(proc, { kind: "npm", port, ws: `ws://127.0.0.1:${port}`, dataDir: path.join(dir, "amrg") })
    servers.push(s)
    return s
  }
}

/**
 * Waits until the server answers an automerge-repo join; returns the attempts
 * it took. The npm sync server prints "Listening" before its WebSocket adapter
 * is attached (that waits for its storage id): a client connecting in between
 * gets no answer, is dropped by the next keep-alive sweep (<= 5 s) and retries
 * 5 s later. Probing with short-lived clients keeps that out of the numbers.
 */
async function servesPeers(proc, ws, deadlineMs = 30_000) {
  const end = Date.now() + deadlineMs
  for (let attempt = 1; ; attempt++) {
    const repo = new Repo({ network: [new WebSocketClientAdapter(ws, 600_000)] })
    let ok = false
    try {
      ok = await until("probe", () => repo.peers.length > 0, 1_000).then(() => true, () => false)
    } finally {
      await repo.shutdown()
    }
    if (ok) return attempt
    if (proc.exited) throw new Error(`${proc.name} exited:\n${proc.out}`)
    if (Date.now() > end) throw new Error(`${proc.name} did not answer an automerge-repo join on ${ws} within ${deadlineMs} ms`)
  }
}

async function startMergeflow(name, peers = []) {
  const dir = tempDir("mergeflow-bench-node-")
  writeFileSync(path.join(dir, "config.toml"), "")
  const args = ["start", "-c", path.join(dir, "config.toml"), "--data-dir", path.join(dir, "data"),
    "--api", "127.0.0.1:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--log-format", "text"]
  for (const p of peers) args.push("--peer", p)
  const proc = spawnKept(name, BIN, args, {})
  const [api, peerId, addr] = await waitOutput(proc, (o) => {
    const r = o.match(/ready: api=(\S+) peer_id=(\S+)/)
    const l = o.match(/listening addr=(\/ip4\/127\.0\.0\.1\/tcp\/\d+\/p2p\/\S+)/)
    return r && l && [r[1], r[2], l[1]]
  })
  const port = Number(new URL(api).port)
  const n = Object.assign(proc, { kind: "mergeflow", api, peerId, addr, port, ws: api.replace(/^http/, "ws") + "/v1/automerge" })
  servers.push(n)
  return n
}

/** Waits until `a` and `b` list each other as connected peers. */
async function meshed(a, b) {
  await until(`${a.name} and ${b.name} connected`, async () => {
    const has = async (x, y) => {
      const list = (await http(x, "GET", "/v1/peers")).body
      return Array.isArray(list) && list.some((p) => p.peer_id === y.peerId && p.connected !== false)
    }
    return (await has(a, b)) && (await has(b, a))
  }, 60_000)
}

function rssMb(proc) {
  try {
    const m = readFileSync(`/proc/${proc.child.pid}/status`, "utf8").match(/VmRSS:\s+(\d+) kB/)
    return m ? Math.round(Number(m[1]) / 102.4) / 10 : null
  } catch {
    return null
  }
}

// ------------------------------------------------------ "has it stored?" --
const sameHeads = (a, b) => a.length === b.length && [...a].sort().join() === [...b].sort().join()

/** Heads of doc `id` from the npm server's files on disk (null: not there, or mid-write). */
function npmStoredHeads(server, id) {
  const docDir = path.join(server.dataDir, id.slice(0, 2), id.slice(2))
  let doc = A.init()
  let chunks = 0
  for (const kind of ["snapshot", "incremental"]) {
    let names
    try {
      names = readdirSync(path.join(docDir, kind))
    } catch {
      continue
    }
    for (const n of names) {
      try {
        doc = A.loadIncremental(doc, new Uint8Array(readFileSync(path.join(docDir, kind, n))))
        chunks++
      } catch {
        return null
      }
    }
  }
  return chunks ? A.getHeads(doc) : null
}

/** Heads of every JS-created doc (mergeflow doc am/<id>) on a node: id -> heads, from the doc listing (one request per 10,000 docs). */
async function nodeAmHeads(node) {
  const heads = new Map()
  const limit = 10_000
  let after = null
  for (;;) {
    const q = `prefix=${encodeURIComponent("am/")}&limit=${limit}` + (after ? `&after=${encodeURIComponent(after)}` : "")
    const r = await http(node, "GET", `/v1/docs?${q}`)
    if (r.status !== 200 || !Array.isArray(r.body)) throw new Error(`GET /v1/docs on ${node.name}: ${r.status} ${JSON.stringify(r.body)}`)
    for (const d of r.body) heads.set(d.id.slice(3), d.heads)
    if (r.body.length < limit) return heads
    after = r.body[r.body.length - 1].id
  }
}

/**
 * Polls until every doc in `want` (id -> heads) is stored with those heads on
 * every server: the npm server's files, a node's doc listing.
 */
async function waitStored(targetServers, want, what, deadlineMs) {
  const end = Date.now() + deadlineMs
  for (const s of targetServers) {
    let pending = [...want.keys()]
    for (;;) {
      let have
      if (s.kind === "npm") have = (id) => npmStoredHeads(s, id)
      else {
        const listed = await nodeAmHeads(s).catch(() => new Map())
        have = (id) => listed.get(id)
      }
      pending = pending.filter((id) => {
        const h = have(id)
        return !h || !sameHeads(h, want.get(id))
      })
      mark(`${s.name}: ${pending.length} of ${want.size} not yet stored (${what})`)
      if (!pending.length) break
      if (s.exited) throw new Error(`${s.name} exited while waiting for ${what}:\n${tail(s.out)}`)
      if (Date.now() > end) throw new Error(`timed out waiting for ${what} on ${s.name}: ${pending.length} of ${want.size} docs missing or behind`)
      await new Promise((r) => setTimeout(r, 50))
    }
  }
}

// ---------------------------------------------------------------- clients --
/** A loopback TCP proxy to `port` that counts bytes each way. */
async function countingProxy(port) {
  const stats = { up: 0, down: 0, conns: 0 }
  const socks = new Set()
  const srv = createServer((c) => {
    stats.conns++
    const s = createConnection({ host: "127.0.0.1", port })
    c.setNoDelay(true)
    s.setNoDelay(true)
    for (const x of [c, s]) {
      socks.add(x)
      x.on("close", () => socks.delete(x))
      x.on("error", () => {
        c.destroy()
        s.destroy()
      })
    }
    c.on("data", (d) => (stats.up += d.length))
    s.on("data", (d) => (stats.down += d.length))
    c.pipe(s)
    s.pipe(c)
  })
  await new Promise((r) => srv.listen(0, "127.0.0.1", r))
  const proxy = {
    stats,
    port: srv.address().port,
    close: async () => {
      for (const x of socks) x.destroy()
      await new Promise((r) => srv.close(r))
    },
  }
  cleanups.push(proxy.close)
  return proxy
}

/** A JS client (no storage) of `ws`, shut down at cleanup; resolves once it has its server as a peer. */
async function jsClient(ws, what) {
  const adapter = new WebSocketClientAdapter(ws)
  // Messages from the server (count, payload bytes) and both ways (type and
  // sync data, classified later by `kinds` so that decoding them costs
  // nothing while the clock runs).
  const msgs = { in: 0, inBytes: 0, inLog: [], outLog: [] }
  const recv = adapter.receiveMessage.bind(adapter)
  adapter.receiveMessage = (bytes) => {
    msgs.in++
    msgs.inBytes += bytes.byteLength
    return recv(bytes)
  }
  adapter.on("message", (m) => msgs.inLog.push([m.type, m.data]))
  const send = adapter.send.bind(adapter)
  adapter.send = (m) => {
    msgs.outLog.push([m.type, m.data])
    return send(m)
  }
  const repo = new Repo({ network: [adapter] })
  let down = false
  const shutdown = async () => {
    if (!down) {
      down = true
      await repo.shutdown()
    }
  }
  cleanups.push(shutdown)
  await until(`${what} connected to ${ws}`, () => repo.peers.length > 0, 30_000)
  return { repo, adapter, msgs, shutdown }
}

/** Counts of message kinds in a log slice: "sync" split into "sync+changes" / "sync-empty". */
function kinds(log) {
  const out = {}
  for (const [type, data] of log) {
    let k = type
    if (type === "sync" || type === "request") {
      try {
        k += A.decodeSyncMessage(data).changes.length ? "+changes" : "-empty"
      } catch {}
    }
    out[k] = (out[k] ?? 0) + 1
  }
  return out
}

function todo(i) {
  return {
    title: `todo list ${i}`,
    items: Array.from({ length: 5 }, (_, k) => ({ id: k, text: `item ${k} of ${i}`, done: k % 2 === 0 })),
  }
}

// ------------------------------------------------------------------ phases --
/** Seeds DOCS docs through `seedWs`, waits until `storeOn` all have them, loads them fresh from `loadServer`. */
async function loadPhase(name, seedWs, storeOn, loadServer) {
  // Seed.
  mark(`${name}: server up`)
  const seeder = await jsClient(seedWs, `${name} seeder`)
  mark(`${name}: seeder connected`)
  const t0 = performance.now()
  const want = new Map()
  const urls = []
  for (let i = 0; i < DOCS; i++) {
    const h = seeder.repo.create(todo(i))
    want.set(h.documentId, A.getHeads(h.doc()))
    urls.push(h.url)
  }
  await waitStored(storeOn, want, `${DOCS} seeded docs`, 300_000 + DOCS * 500)
  const seedMs = performance.now() - t0
  mark(`${name}: seeded and stored`)
  await seeder.shutdown()

  // Load with a fresh client through the counting proxy.
  const proxy = await countingProxy(loadServer.port)
  const wsPath = new URL(loadServer.ws).pathname
  const c = await jsClient(`ws://127.0.0.1:${proxy.port}${wsPath === "/" ? "" : wsPath}`, `${name} loader`)
  const hs = { down: proxy.stats.down, up: proxy.stats.up, msgs: c.msgs.in, msgBytes: c.msgs.inBytes, inLog: c.msgs.inLog.length, outLog: c.msgs.outLog.length }
  const l0 = performance.now()
  const handles = []
  for (let i = 0; i < urls.length; i += BATCH) {
    handles.push(...(await Promise.all(urls.slice(i, i + BATCH).map((u) => c.repo.find(u)))))
  }
  const loadMs = performance.now() - l0
  mark(`${name}: loaded`)
  const atDone = { down: proxy.stats.down - hs.down, up: proxy.stats.up - hs.up, msgs: c.msgs.in - hs.msgs, msgBytes: c.msgs.inBytes - hs.msgBytes }
  // Every doc arrived whole.
  handles.forEach((h, i) => {
    const d = h.doc()
    if (String(d?.title) !== `todo list ${i}` || d.items?.length !== 5 || String(d.items[4].text) !== `item 4 of ${i}`)
      throw new Error(`${name}: doc ${i} loaded wrong: ${JSON.stringify(d)}`)
  })
  // Then let the connection go quiet (the client's acks, late messages), up to 15 s.
  let last = -1
  let quietSince = performance.now()
  const quietEnd = performance.now() + 15_000
  while (performance.now() < quietEnd) {
    const now = proxy.stats.down + proxy.stats.up
    if (now !== last) {
      last = now
      quietSince = performance.now()
    } else if (performance.now() - quietSince > 500) break
    await new Promise((r) => setTimeout(r, 50))
  }
  const settled = { down: proxy.stats.down - hs.down, up: proxy.stats.up - hs.up, msgs: c.msgs.in - hs.msgs }
  const kindsIn = kinds(c.msgs.inLog.slice(hs.inLog))
  const outLog = c.msgs.outLog.slice(hs.outLog)
  const kindsOut = kinds(outLog)
  const syncDataOut = outLog.reduce((n, [, data]) => n + (data?.byteLength ?? 0), 0)
  const rss = Object.fromEntries(storeOn.map((s) => [s.name, rssMb(s)]))
  mark(`${name}: connection quiet`)
  const serverPeer = c.repo.peers[0] ?? null
  await c.shutdown()
  await proxy.close()
  return {
    seed_ms: round(seedMs),
    load_ms: round(loadMs),
    load_docs_per_s: round((DOCS / loadMs) * 1000),
    handshake_bytes: { down: hs.down, up: hs.up },
    load_bytes_down: atDone.down,
    load_bytes_up: atDone.up,
    load_msgs_in: atDone.msgs,
    load_msg_payload_bytes_in: atDone.msgBytes,
    settled_bytes_down: settled.down,
    settled_bytes_up: settled.up,
    settled_msgs_in: settled.msgs,
    settled_msg_kinds_in: kindsIn,
    settled_msg_kinds_out: kindsOut,
    settled_sync_data_bytes_out: syncDataOut,
    bytes_down_per_doc: round(atDone.down / DOCS),
    tcp_connections: proxy.stats.conns,
    server_peer_id: serverPeer, // in every message the client sends (targetId)
    rss_mb_after_load: rss,
  }
}

/** Resolves with the time R's handle first shows n === i (rejects after 30 s). */
function arrival(h, i) {
  return new Promise((resolve, reject) => {
    const check = () => {
      if (h.doc()?.n === i) {
        const t = performance.now()
        stop()
        resolve(t)
      }
    }
    const timer = setTimeout(() => {
      stop()
      reject(new Error(`edit ${i} did not reach the reader within 30 s (it has n=${h.doc()?.n})`))
    }, 30_000)
    const stop = () => {
      clearTimeout(timer)
      h.off("change", check)
    }
    h.on("change", check)
    check()
  })
}

/** Edit latency W -> R; `storeOn` must hold the doc before R looks for it. */
async function editPhase(name, wWs, rWs, storeOn) {
  const w = await jsClient(wWs, `${name} writer`)
  const r = await jsClient(rWs, `${name} reader`)
  const hw = w.repo.create({ n: -1 })
  await waitStored(storeOn, new Map([[hw.documentId, A.getHeads(hw.doc())]]), "the edit doc", 60_000)
  const hr = await until(`${name} reader finds the edit doc`, async () => {
    try {
      return await r.repo.find(hw.url)
    } catch {
      return null // unavailable (not there yet)
    }
  }, 60_000)
  mark(`${name}: reader has the edit doc`)
  let i = 0
  const run = async (gap) => {
    const lat = []
    let w0 = 0
    let r0 = 0
    for (let k = 0; k < WARMUP + EDITS; k++, i++) {
      if (k === WARMUP) [w0, r0] = [w.msgs.in, r.msgs.in]
      const got = arrival(hr, i)
      const t0 = performance.now()
      hw.change((d) => {
        d.n = i
      })
      const t1 = await got
      if (k >= WARMUP) lat.push(t1 - t0)
      // Pacing, not synchronization: the edit has arrived; start the next one `gap` ms after this one.
      const left = t0 + gap - performance.now()
      if (left > 0) await new Promise((res) => setTimeout(res, left))
    }
    // Messages each client received per measured edit (sync rounds the protocol took).
    return { ...stats(lat), w_msgs_in_per_edit: round((w.msgs.in - w0) / EDITS), r_msgs_in_per_edit: round((r.msgs.in - r0) / EDITS) }
  }
  const out = { back_to_back: await run(0) }
  mark(`${name}: back-to-back edits done`)
  if (GAP > 0) out[`paced_${GAP}ms`] = await run(GAP)
  mark(`${name}: edits done`)
  await r.shutdown()
  await w.shutdown()
  mark(`${name}: edit clients shut down`)
  return out
}

function stats(xs) {
  const s = [...xs].sort((a, b) => a - b)
  const pick = (q) => s[Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1))]
  return { n: s.length, p50: round(pick(0.5)), p99: round(pick(0.99)), max: round(s[s.length - 1]), mean: round(s.reduce((a, b) => a + b, 0) / s.length) }
}
const round = (x) => Math.round(x * 100) / 100
const tail = (s, n = 30) => s.split("\n").slice(-n).join("\n")

// -------------------------------------------------------------------- logs --
const EXPECTED = [/open network: any node/, /Failed to trigger bootstrap: No known peers/]
function logReport(s) {
  const lines = s.out.split("\n")
  if (s.kind === "mergeflow") {
    const bad = lines.filter((l) => /\s(WARN|ERROR)\s|panicked/.test(l) && !EXPECTED.some((re) => re.test(l)))
    const counts = {}
    for (const l of bad) {
      // Group by level + target + message start (timestamps and values vary).
      const m = l.match(/\s(WARN|ERROR)\s+(\S+):\s+(.{0,60})/)
      const k = m ? `${m[1]} ${m[2]}: ${m[3].replace(/[0-9a-f]{8,}|\d+/g, "#")}` : l.slice(0, 100)
      counts[k] = (counts[k] ?? 0) + 1
    }
    return { lines: lines.length, warn_error: bad.length, groups: counts, exit: s.exit, clean_stop: /node stopped/.test(s.out) }
  }
  const bad = lines.filter((l) => /error|warn|exception|unavailable/i.test(l))
  const counts = {}
  for (const l of bad) counts[l.slice(0, 100)] = (counts[l.slice(0, 100)] ?? 0) + 1
  return { lines: lines.length, warn_error: bad.length, groups: counts, exit: s.exit, join_probes: s.probes }
}

// -------------------------------------------------------------------- main --
async function benchTarget(t) {
  const started = performance.now()
  if (t === "npm") {
    const s = await startSyncServer()
    const load = await loadPhase(t, s.ws, [s], s)
    const edits = await editPhase(t, s.ws, s.ws, [s])
    await s.stop()
    return { load, edits, wall_s: round((performance.now() - started) / 1000) }
  }
  if (t === "one") {
    const n = await startMergeflow("mergeflow one")
    const load = await loadPhase(t, n.ws, [n], n)
    const edits = await editPhase(t, n.ws, n.ws, [n])
    await n.stop()
    return { load, edits, wall_s: round((performance.now() - started) / 1000) }
  }
  const a = await startMergeflow("mergeflow mesh A")
  const b = await startMergeflow("mergeflow mesh B", [a.addr])
  await meshed(a, b)
  const load = await loadPhase(t, a.ws, [a, b], b)
  const edits = await editPhase(t, a.ws, b.ws, [a, b])
  await b.stop()
  await a.stop()
  return { load, edits, wall_s: round((performance.now() - started) / 1000) }
}

function binInfo() {
  const info = { path: path.resolve(BIN) }
  try {
    const st = statSync(BIN)
    info.mtime = st.mtime.toISOString()
    info.size_mb = round(st.size / 1048576)
    info.version = execFileSync(BIN, ["--version"], { encoding: "utf8", timeout: 10_000 }).trim()
  } catch (e) {
    info.error = String(e.message ?? e)
  }
  info.build = /\/release\//.test(info.path) ? "release" : /\/debug\//.test(info.path) ? "debug" : "unknown"
  return info
}

function pkgVersion(p) {
  try {
    return JSON.parse(readFileSync(path.join(HERE, "node_modules", p, "package.json"), "utf8")).version
  } catch {
    return null
  }
}

function printTable(res) {
  const ts = Object.keys(res.targets)
  const names = { npm: "npm sync-server", one: "mergeflow x1", mesh: "mergeflow A->B" }
  const rows = [["", ...ts.map((t) => names[t])]]
  const row = (label, f) => rows.push([label, ...ts.map((t) => {
    try {
      const v = f(res.targets[t])
      return v === undefined || v === null ? "-" : String(v)
    } catch {
      return "-"
    }
  })])
  const kb = (b) => (b / 1024).toFixed(1)
  row("seed+store ms", (r) => r.load.seed_ms.toFixed(0))
  row(`load ${DOCS} docs ms`, (r) => r.load.load_ms.toFixed(0))
  row("load docs/s", (r) => r.load.load_docs_per_s.toFixed(0))
  row("load KiB down (wire)", (r) => kb(r.load.load_bytes_down))
  row("load KiB up (wire)", (r) => kb(r.load.load_bytes_up))
  row("bytes down per doc", (r) => r.load.bytes_down_per_doc.toFixed(0))
  row("msgs in during load", (r) => r.load.load_msgs_in)
  row("msgs in settled", (r) => Object.entries(r.load.settled_msg_kinds_in).map(([k, n]) => `${n} ${k}`).join(", "))
  row("msgs out settled", (r) => Object.entries(r.load.settled_msg_kinds_out).map(([k, n]) => `${n} ${k}`).join(", "))
  row("KiB down/up settled", (r) => `${kb(r.load.settled_bytes_down)}/${kb(r.load.settled_bytes_up)}`)
  row("server RSS MiB", (r) => Object.values(r.load.rss_mb_after_load).join("/"))
  for (const mode of Object.keys(res.targets[ts[0]]?.edits ?? {})) {
    row(`${mode} p50 ms`, (r) => r.edits[mode].p50.toFixed(1))
    row(`${mode} p99 ms`, (r) => r.edits[mode].p99.toFixed(1))
    row(`${mode} max ms`, (r) => r.edits[mode].max.toFixed(1))
    row(`${mode} msgs in W/R per edit`, (r) => `${r.edits[mode].w_msgs_in_per_edit}/${r.edits[mode].r_msgs_in_per_edit}`)
  }
  row("wall s", (r) => r.wall_s.toFixed(0))
  const w = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)))
  console.log(rows.map((r) => r.map((x, c) => (c ? x.padStart(w[c]) : x.padEnd(w[c]))).join("  ")).join("\n"))
}

async function main() {
  const res = {
    when: new Date().toISOString(),
    args: { docs: DOCS, edits: EDITS, warmup: WARMUP, batch: BATCH, gap_ms: GAP, targets: TARGETS },
    mergeflow_bin: binInfo(),
    machine: { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, loadavg: os.loadavg().map(round), node: process.version },
    packages: Object.fromEntries(["@automerge/automerge", "@automerge/automerge-repo", "@automerge/automerge-repo-network-websocket",
      "@automerge/automerge-repo-sync-server"].map((p) => [p, pkgVersion(p)])),
    targets: {},
    logs: {},
  }
  console.log(`mergeflow binary: ${res.mergeflow_bin.path} (${res.mergeflow_bin.build} build, ${res.mergeflow_bin.version ?? res.mergeflow_bin.error}, built ${res.mergeflow_bin.mtime})`)
  console.log(`docs=${DOCS} edits=${EDITS} warmup=${WARMUP} batch=${BATCH} gap=${GAP}ms; ${res.machine.cpus} CPUs, load ${res.machine.loadavg.join(" ")}`)
  let failed = null
  try {
    for (const t of TARGETS) {
      console.log(`-- ${t} ...`)
      const cleanupMark = cleanups.length
      try {
        res.targets[t] = await benchTarget(t)
        console.log(`   done in ${res.targets[t].wall_s} s`)
      } catch (e) {
        failed ??= e
        res.targets[t] = { error: String(e.message ?? e).split("\n")[0] }
        console.error(`   ${t} failed: ${e.stack ?? e}`)
      } finally {
        await runCleanups(cleanupMark) // this target's clients, proxies, servers, dirs
      }
    }
  } finally {
    await runCleanups()
  }
  for (const s of servers) res.logs[s.name] = logReport(s)
  if (opt["log-dir"]) {
    mkdirSync(opt["log-dir"], { recursive: true })
    for (const s of servers) writeFileSync(path.join(opt["log-dir"], s.name.replace(/\W+/g, "-") + ".log"), s.out)
  }
  console.log()
  const ok = Object.fromEntries(Object.entries(res.targets).filter(([, r]) => !r.error))
  if (Object.keys(ok).length) printTable({ targets: ok })
  console.log()
  for (const [name, l] of Object.entries(res.logs)) {
    const how = l.clean_stop === false ? ", no 'node stopped' line" : ""
    const probes = l.join_probes > 1 ? `, answered a join on probe ${l.join_probes}` : ""
    console.log(`log ${name}: ${l.lines} lines, ${l.warn_error} unexpected warn/error, exit ${l.exit}${how}${probes}`)
    for (const [k, n] of Object.entries(l.groups).slice(0, 10)) console.log(`   ${n} x ${k}`)
  }
  console.log("BENCH_JSON " + JSON.stringify(res))
  return failed ? 1 : 0
}

main().then(
  (code) => process.exit(code),
  async (e) => {
    console.error(e?.stack ?? e)
    await runCleanups()
    process.exit(1)
  },
)
