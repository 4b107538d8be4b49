// Serves this directory's page and bundle on loopback (any static server
// works as well). PORT picks the port; the default lets the OS choose.
import { createServer } from "node:http"
import { readFile } from "node:fs/promises"
import path from "node:path"

const root = import.meta.dirname
const types = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8" }
const files = new Set(["/index.html", "/dist/app.js"])

const server = createServer(async (req, res) => {
  const p = new URL(req.url, "http://x").pathname
  const file = p === "/" ? "/index.html" : p
  if (!files.has(file)) {
    res.writeHead(404).end("not found")
    return
  }
  try {
    const body = await readFile(path.join(root, file))
    res.writeHead(200, { "content-type": types[path.extname(file)] }).end(body)
  } catch (e) {
    res.writeHead(500).end(String(e))
  }
})
server.listen(Number(process.env.PORT || 0), "127.0.0.1", () => {
  console.log(`serving http://127.0.0.1:${server.address().port}/`)
})
