// What a JS client meets at the door: unknown URLs, tokens, tickets.
import { test } from "node:test"
import assert from "node:assert/strict"
import { client, http, startNode } from "./lib/cluster.mjs"

const TOKEN = "interop-token-0123456789"

test("an unknown URL makes find reject", async (t) => {
  const node = await startNode(t)
  const repo = client(t, node)
  // A well-formed URL no node has.
  await assert.rejects(() => repo.find("automerge:2j9knpCseyhnK8izDmLpGP5WMdZQ"), /unavailable/i)
  // A named doc that does not exist yet: the same answer.
  const url = (await http(node, "GET", "/v1/docs/nobody%2Fhere/url")).body.url
  await assert.rejects(() => repo.find(url), /unavailable/i)
  // System docs have no URL.
  const sys = await http(node, "GET", "/v1/docs/_mergeflow%2Fworkflows%2Fx/url")
  assert.equal(sys.status, 403, JSON.stringify(sys.body))
})

/** The HTTP status the upgrade gets (101 when it is accepted). */
async function upgradeStatus(node, query) {
  const { request } = await import("node:http")
  const u = new URL(node.api + "/v1/automerge" + query)
  return new Promise((resolve, reject) => {
    const req = request({
      host: u.hostname,
      port: u.port,
      path: u.pathname + u.search,
      headers: {
        Connection: "Upgrade",
        Upgrade: "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
      },
    })
    req.on("upgrade", (res, socket) => {
      socket.destroy()
      resolve(res.statusCode)
    })
    req.on("response", (res) => {
      res.resume()
      resolve(res.statusCode)
    })
    req.on("error", reject)
    req.end()
  })
}

test("with api.token, a missing or wrong token gets 401; the token and a fresh ticket work; a used or expired ticket is refused", async (t) => {
  const node = await startNode(t, {
    config: `[api]\ntoken = "${TOKEN}"\n[automerge]\nticket_ttl_ms = 300\n`,
  })
  const auth = { authorization: `Bearer ${TOKEN}` }
  assert.equal(await upgradeStatus(node, ""), 401)
  assert.equal(await upgradeStatus(node, "?token=wrong-token-wrong-token"), 401)
  assert.equal(await upgradeStatus(node, `?token=${TOKEN}`), 101)

  // Tickets need the token themselves.
  assert.equal((await http(node, "POST", "/v1/tickets")).status, 401)
  const issued = await http(node, "POST", "/v1/tickets", undefined, auth)
  assert.equal(issued.status, 200, JSON.stringify(issued.body))
  const { ticket, expires_at } = issued.body
  assert.ok(expires_at > Date.now() && expires_at <= Date.now() + 1000)
  assert.equal(await upgradeStatus(node, `?ticket=${ticket}`), 101)
  assert.equal(await upgradeStatus(node, `?ticket=${ticket}`), 401, "a ticket works once")

  const late = (await http(node, "POST", "/v1/tickets", undefined, auth)).body.ticket
  await new Promise((r) => setTimeout(r, 600))
  assert.equal(await upgradeStatus(node, `?ticket=${late}`), 401, "an expired ticket is refused")

  // A real client with a ticket syncs.
  await http(node, "POST", "/v1/docs", { id: "secret/doc", value: { v: "ok" } }, auth)
  const url = (await http(node, "GET", "/v1/docs/secret%2Fdoc/url", undefined, auth)).body.url
  const fresh = (await http(node, "POST", "/v1/tickets", undefined, auth)).body.ticket
  const handle = await client(t, node, { query: `?ticket=${fresh}` }).find(url)
  assert.equal(handle.doc().v, "ok")
})
