// JS automerge-repo clients against a mesh of real mergeflow nodes.
import { test } from "node:test"
import assert from "node:assert/strict"
import * as A from "@automerge/automerge"
import { client, connected, docJson, http, startNode, until } from "./lib/cluster.mjs"

async function twoNodes(t) {
  const a = await startNode(t)
  const b = await startNode(t, { peers: [a.addr] })
  await connected(a, b)
  return [a, b]
}

test("a doc created over HTTP on node B is found by a JS client on node A by its URL", async (t) => {
  const [a, b] = await twoNodes(t)
  const created = await http(b, "POST", "/v1/docs", { id: "notes/from-b", value: { title: "hello", tags: ["x"], n: 1 } })
  assert.equal(created.status, 201, JSON.stringify(created.body))
  const { url } = (await http(b, "GET", "/v1/docs/notes%2Ffrom-b/url")).body
  assert.match(url, /^automerge:/)
  assert.equal((await http(a, "GET", "/v1/docs/notes%2Ffrom-b/url")).body.url, url, "the same URL on every node")
  await until("A has the doc", () => docJson(a, "notes/from-b"))
  const handle = await client(t, a).find(url)
  const doc = handle.doc()
  assert.equal(doc.title, "hello")
  assert.equal(typeof doc.title, "string", "a string written over HTTP reads as a plain JS string")
  assert.deepEqual([...doc.tags], ["x"])
  assert.equal(doc.n, 1)
})

test("a JS edit reaches node B over the mesh and fires workflows; a JS-created doc appears on B as am/<id>", async (t) => {
  const [a, b] = await twoNodes(t)
  const wf = `name = "shout"
[on]
doc = "notes/*"
path = "/title"
origin = "any"
[[steps]]
id = "upper"
kind = "derive"
set = { "/shout" = "doc.title.to_upper()" }
`
  const applied = await http(a, "POST", "/v1/workflows", wf, { "content-type": "application/toml" })
  assert.ok(applied.status < 300, JSON.stringify(applied.body))
  await http(a, "POST", "/v1/docs", { id: "notes/n1", value: { title: "first" } })
  await until("B has the doc", () => docJson(b, "notes/n1"))
  const repo = client(t, a)
  const handle = await repo.find((await http(a, "GET", "/v1/docs/notes%2Fn1/url")).body.url)
  handle.change((d) => {
    d.title = "from js"
  })
  // B gets the edit through the mesh, and a workflow derives from it there.
  await until("B has the JS edit and its derived value", async () => {
    const d = await docJson(b, "notes/n1")
    return d?.title === "from js" && d?.shout === "FROM JS"
  })
  // The run on A (the node the client is connected to) says where the change came from.
  const runs = await until("a run on A from the client's change", async () => {
    const r = (await http(a, "GET", "/v1/runs?workflow=shout")).body
    const list = Array.isArray(r) ? r : r.runs
    return list?.find((run) => run.origin?.startsWith("automerge:"))
  })
  assert.equal(runs.doc, "notes/n1")
  // The derived value reaches the JS client too.
  await until("the client sees the derived value", () => handle.doc().shout === "FROM JS")
  assert.equal(typeof handle.doc().shout, "string")

  // A doc the client creates: am/<its id> on every node, same URL back.
  const mine = repo.create({ made: "by js", items: [1, 2] })
  const id = mine.url.slice("automerge:".length)
  const onB = await until("B has the client's doc", () => docJson(b, "am/" + id))
  assert.deepEqual(onB, { made: "by js", items: [1, 2] })
  assert.equal((await http(b, "GET", `/v1/docs/am%2F${id}/url`)).body.url, mine.url)
})

test("two JS clients on different nodes edit one doc concurrently and converge with both edits", async (t) => {
  const [a, b] = await twoNodes(t)
  await http(a, "POST", "/v1/docs", { id: "shared/list", value: { items: [], note: "" } })
  const url = (await http(a, "GET", "/v1/docs/shared%2Flist/url")).body.url
  await until("B has the doc", () => docJson(b, "shared/list"))
  const ha = await client(t, a).find(url)
  const hb = await client(t, b).find(url)
  for (let i = 0; i < 20; i++) {
    ha.change((d) => d.items.push(`a${i}`))
    hb.change((d) => d.items.push(`b${i}`))
    hb.change((d) => A.splice(d, ["note"], 0, 0, i % 2 ? "b" : "B"))
  }
  const want = 40
  await until("both clients and both nodes hold all 40 items", async () => {
    const [ja, jb] = [await docJson(a, "shared/list"), await docJson(b, "shared/list")]
    return (
      ha.doc().items.length === want &&
      hb.doc().items.length === want &&
      ja?.items.length === want &&
      jb?.items.length === want
    )
  })
  assert.deepEqual(A.getHeads(ha.doc()).sort(), A.getHeads(hb.doc()).sort())
  const ja = await docJson(a, "shared/list")
  assert.deepEqual(ja, await docJson(b, "shared/list"))
  assert.deepEqual([...ha.doc().items], ja.items)
  assert.equal(ja.note.length, 20, "text the client spliced reads back over HTTP as a JSON string")
})
