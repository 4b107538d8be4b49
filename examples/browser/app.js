// A todo list on automerge-repo that syncs with a mergeflow node.
// Page parameters: ?node=<ws URL of a node's /v1/automerge>&doc=<automerge URL>
// (run.sh prints both). Bundled by esbuild: `npm run build`.
import { automergeWasmBase64 } from "@automerge/automerge/automerge.wasm.base64"
import { Repo, initializeBase64Wasm } from "@automerge/automerge-repo/slim"
import { WebSocketClientAdapter } from "@automerge/automerge-repo-network-websocket"
import { IndexedDBStorageAdapter } from "@automerge/automerge-repo-storage-indexeddb"

const params = new URLSearchParams(location.search)
const nodeUrl = params.get("node")
const docUrl = params.get("doc")
const $ = (id) => document.getElementById(id)

function status(text) {
  $("status").textContent = text
}

async function main() {
  if (!nodeUrl || !docUrl) {
    status("add ?node=ws://HOST:PORT/v1/automerge&doc=automerge:... to the address")
    return
  }
  $("doc-url").textContent = docUrl
  // The wasm comes inlined in the bundle (no wasm loader needed).
  await initializeBase64Wasm(automergeWasmBase64)
  const adapter = new WebSocketClientAdapter(nodeUrl)
  // Each page keeps its own offline copy (IndexedDB, one database per node URL).
  const repo = new Repo({ network: [adapter], storage: new IndexedDBStorageAdapter("todos " + nodeUrl) })
  repo.networkSubsystem.on("peer", () => status("connected to " + nodeUrl))
  repo.networkSubsystem.on("peer-disconnected", () => status("offline: edits are kept and sync on reconnect"))
  status("connecting to " + nodeUrl)
  const handle = await repo.find(docUrl)
  status("connected to " + nodeUrl)
  const render = () => {
    const doc = handle.doc()
    const items = doc?.items ?? []
    $("title").textContent = doc?.title ?? "todos"
    $("items").replaceChildren(
      ...items.map((item, i) => {
        const box = document.createElement("input")
        box.type = "checkbox"
        box.checked = !!item.done
        box.addEventListener("change", () =>
          handle.change((d) => {
            d.items[i].done = box.checked
          }),
        )
        const label = document.createElement("label")
        label.append(box, " ", item.text)
        const li = document.createElement("li")
        li.dataset.text = item.text
        li.dataset.done = String(!!item.done)
        li.append(label)
        return li
      }),
    )
  }
  handle.on("change", render)
  render()
  $("add").addEventListener("submit", (e) => {
    e.preventDefault()
    const text = $("text").value.trim()
    if (!text) return
    handle.change((d) => {
      if (!d.items) d.items = []
      d.items.push({ text, done: false })
    })
    $("text").value = ""
  })
  document.body.dataset.ready = "true"
}

main().catch((e) => {
  status("error: " + e.message)
  console.error(e)
})
