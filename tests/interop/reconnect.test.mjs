// A client that goes away and comes back picks up where it was.
import { test } from "node:test"
import assert from "node:assert/strict"
import { mkdtempSync, rmSync } from "node:fs"
import { tmpdir } from "node:os"
import path from "node:path"
import { Repo } from "@automerge/automerge-repo"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { NodeFSStorageAdapter } from "@automerge/automerge-repo-storage-nodefs"
import { http, onEnd, startNode, until } from "./lib/cluster.mjs"

/** A repo with storage in `dir`, counting the sync bytes it receives. */
// How often a repo saves a doc or sync state at most (automerge-repo's
// default). The saves are throttled timers that neither `flush` nor
// `shutdown` waits for.
const SAVE_MS = 100

function counted(node, dir) {
  const repo = new Repo({
    network: [new WebSocketClientAdapter(node.ws)],
    storage: new NodeFSStorageAdapter(dir),
    saveDebounceRate: SAVE_MS,
  })
  const seen = { bytes: 0 }
  repo.networkSubsystem.on("message", (m) => {
    if (m.type === "sync" || m.type === "request") seen.bytes += m.data?.byteLength ?? 0
  })
  return { repo, seen }
}

test("a client that disconnects and reconnects gets what changed, not the whole doc again", async (t) => {
  // Removed last (cleanups run in reverse), once the node and both repos
  // are gone and a save throttled before the shutdown has fired.
  const dir = mkdtempSync(path.join(tmpdir(), "mergeflow-interop-storage-"))
  onEnd(t, async () => {
    await new Promise((done) => setTimeout(done, 3 * SAVE_MS))
    rmSync(dir, { recursive: true, force: true })
  })
  const node = await startNode(t)
  // A doc of 20 changes of 100 items each. (Automerge sends the whole doc
  // instead of changes when more than a third of its changes are missing:
  // a change on a doc of one or two changes is always the whole doc.)
  const created = await http(node, "POST", "/v1/docs", { id: "big/doc", value: {} })
  assert.equal(created.status, 201, JSON.stringify(created.body))
  for (let part = 0; part < 20; part++) {
    const items = Array.from({ length: 100 }, (_, i) => ({ n: part * 100 + i, label: `item number ${part * 100 + i}` }))
    const r = await http(node, "PATCH", "/v1/docs/big%2Fdoc", { [`part${part}`]: items })
    assert.equal(r.status, 200, JSON.stringify(r.body))
  }
  const url = (await http(node, "GET", "/v1/docs/big%2Fdoc/url")).body.url

  const first = counted(node, dir)
  const h1 = await first.repo.find(url)
  assert.equal(h1.doc().part19.length, 100)
  // Let the repo write the doc and its sync state to storage, then go away.
  await first.repo.flush()
  await first.repo.shutdown()
  const full = first.seen.bytes
  assert.ok(full > 10_000, `the first load carried the doc (${full} bytes)`)

  // Meanwhile the doc changes a little on the node.
  await http(node, "PATCH", "/v1/docs/big%2Fdoc", { extra: "while away" })

  const second = counted(node, dir)
  // Flushed first: a sync state the repo saves after it has shut down
  // would land in the storage dir after that dir is removed.
  onEnd(t, async () => {
    await second.repo.flush()
    await second.repo.shutdown()
  })
  const h2 = await second.repo.find(url)
  await until("the client has the change made while it was away", () => h2.doc().extra === "while away")
  assert.equal(h2.doc().part19.length, 100)
  assert.ok(
    second.seen.bytes * 10 < full,
    `the reconnect carried ${second.seen.bytes} bytes against ${full} for the whole doc`,
  )
})
