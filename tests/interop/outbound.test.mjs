// A node that dials an existing automerge-repo sync server
// ([[automerge.servers]]): the npm sync server 0.2.8, started here on
// loopback, and a stock JS client of that server.
import { test } from "node:test"
import assert from "node:assert/strict"
import { spawn } from "node:child_process"
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import path from "node:path"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { connected, docJson, freePort, http, onEnd, startNode, until } from "./lib/cluster.mjs"

const SYNC_SERVER = path.join(
  import.meta.dirname,
  "node_modules/@automerge/automerge-repo-sync-server/src/index.js",
)

/** Starts the npm sync server on `port` with data in `dir`; resolves once it listens. */
async function startSyncServer(t, dir, port) {
  const child = spawn(process.execPath, [SYNC_SERVER], {
    cwd: dir,
    env: { ...process.env, PORT: String(port), DATA_DIR: path.join(dir, "amrg") },
    stdio: ["ignore", "pipe", "pipe"],
  })
  let out = ""
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`sync server did not start:\n${out}`)), 30_000)
    const seen = (d) => {
      out += d
      if (out.includes(`Listening on port ${port}`)) {
        clearTimeout(timer)
        resolve()
      }
    }
    child.stdout.on("data", seen)
    child.stderr.on("data", seen)
    child.on("exit", (code) => reject(new Error(`sync server exited (${code}):\n${out}`)))
  })
  child.removeAllListeners("exit")
  const server = {
    url: `ws://127.0.0.1:${port}`,
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        const exited = new Promise((r) => child.once("exit", r))
        child.kill("SIGTERM")
        await exited
      }
    },
  }
  onEnd(t, server.stop)
  return server
}

/**
 * JS clients of one sync server, shut down together before it stops (a
 * client whose server goes away keeps a reconnect timer that `shutdown`
 * does not clear, and the test process would never exit).
 */
function serverClients(t, server) {
  const repos = []
  const stop = async () => {
    while (repos.length) await repos.pop().shutdown()
  }
  onEnd(t, stop)
  return {
    repo() {
      const repo = new Repo({ network: [new WebSocketClientAdapter(server.url)] })
      repos.push(repo)
      return repo
    },
    stop,
  }
}

async function urlOf(node, id) {
  return (await http(node, "GET", `/v1/docs/${encodeURIComponent(id)}/url`)).body.url
}

test("a node dials the npm sync server and keeps the docs its glob matches synced, across a server restart", async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), "mergeflow-syncserver-"))
  onEnd(t, () => rmSync(dir, { recursive: true, force: true }))
  const port = await freePort()
  let server = await startSyncServer(t, dir, port)
  // Node A shares notes/** with the server; B is only in the mesh.
  const a = await startNode(t, {
    config: `[[automerge.servers]]\nurl = "${server.url}"\ndocs = "notes/**"\n`,
  })
  const b = await startNode(t, { peers: [a.addr] })
  await connected(a, b)

  // A doc written on B reaches the server through A; one outside the glob does not.
  await http(b, "POST", "/v1/docs", { id: "notes/shared", value: { title: "from b", items: [1] } })
  await http(b, "POST", "/v1/docs", { id: "private/x", value: { secret: 1 } })
  await until("A has both docs", async () => (await docJson(a, "notes/shared")) && (await docJson(a, "private/x")))
  const clients = serverClients(t, server)
  const js = clients.repo()
  const handle = await until("the server has notes/shared", async () => {
    try {
      return await js.find(await urlOf(a, "notes/shared"))
    } catch {
      return null // not there yet: find rejects with unavailable
    }
  })
  assert.equal(handle.doc().title, "from b")
  await assert.rejects(
    clients.repo().find(await urlOf(a, "private/x")),
    "a doc outside the glob never reaches the server",
  )

  // An edit by the server's own JS client reaches B through A, and fires as
  // a write from the server's peer.
  handle.change((d) => {
    d.title = "edited at the server"
    d.items.push(2)
  })
  await until("B has the server-side edit", async () => {
    const d = await docJson(b, "notes/shared")
    return d?.title === "edited at the server" && d.items.length === 2
  })

  // A doc created on B after the link is up is announced too.
  await http(b, "POST", "/v1/docs", { id: "notes/later", value: { n: 1 } })
  const later = await until("the server has notes/later", async () => {
    try {
      return await clients.repo().find(await urlOf(a, "notes/later"))
    } catch {
      return null
    }
  })
  assert.equal(later.doc().n, 1)

  const link = async () => (await http(a, "GET", "/v1/status")).body.automerge_servers?.[0]
  const up = await link()
  assert.equal(up.url, server.url)
  assert.equal(up.docs, "notes/**")
  assert.ok(up.connected && up.peer && up.joins === 1, JSON.stringify(up))
  assert.equal(up.shared_docs, 2, "notes/shared and notes/later, not private/x")

  // The server goes away; B keeps writing; the server comes back on the
  // same port with its data, A dials again and the server catches up.
  await clients.stop()
  await server.stop()
  await http(b, "PATCH", "/v1/docs/notes%2Fshared", { title: "while the server was down" })
  await until("A's status shows the link down, and why", async () => {
    const l = await link()
    return !l.connected && l.last_error ? l : null
  })
  await until("A has B's edit", async () => (await docJson(a, "notes/shared"))?.title === "while the server was down")
  server = await startSyncServer(t, dir, port)
  const again = serverClients(t, server)
  const after = await until("the restarted server has the edit made while it was down", async () => {
    const repo = again.repo()
    try {
      const h = await repo.find(await urlOf(a, "notes/shared"))
      return h.doc().title === "while the server was down" ? h : null
    } catch {
      return null
    }
  })
  assert.deepEqual([...after.doc().items], [1, 2])
  const again2 = await link()
  assert.ok(again2.connected && again2.joins >= 2, JSON.stringify(again2))
  assert.doesNotMatch(a.log(), /panicked/)
})
