// Drives Debian's Chromium (headless, through playwright-core) against the
// example: page A on node n1, page B on node n2, one shared doc. Run by
// run.sh --check (scripts/browser-check.sh).
// Usage: node check.mjs <page URL on n1> <page URL on n2> <n1 API> <n2 API>
import { chromium } from "playwright-core"

const [urlA, urlB, api1, api2] = process.argv.slice(2)
const failures = []
function check(what, ok, detail = "") {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}${detail ? ": " + detail : ""}`)
  if (!ok) failures.push(what)
}
const doc = async (api) => (await fetch(`${api}/v1/docs/todos%2Fshared`)).json()
async function until(what, f, deadline = 30_000) {
  const end = Date.now() + deadline
  for (;;) {
    const v = await f().catch(() => null)
    if (v) return v
    if (Date.now() > end) return null
    await new Promise((r) => setTimeout(r, 50))
  }
}
const items = (page) => page.$$eval("#items li", (lis) => lis.map((li) => ({ text: li.dataset.text, done: li.dataset.done === "true" })))
const shows = (page, text) => until(`${text} on the page`, async () => (await items(page)).some((i) => i.text === text))

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
})
const errors = []
try {
  const context = await browser.newContext()
  // Nothing leaves loopback.
  await context.route(/^(?!(http|ws):\/\/127\.0\.0\.1[:/])/, (route) => {
    errors.push("blocked " + route.request().url())
    route.abort()
  })
  const [a, b] = [await context.newPage(), await context.newPage()]
  for (const p of [a, b]) {
    p.on("pageerror", (e) => errors.push(e.message))
    p.on("console", (m) => m.type() === "error" && errors.push("console: " + m.text()))
  }
  await a.goto(urlA)
  await b.goto(urlB)
  check("the todo written over HTTP on n1 shows on page A", await shows(a, "written over HTTP on n1"))
  check("and on page B (through n2)", await shows(b, "written over HTTP on n1"))
  check("page A shows the doc's URL", (await a.textContent("#doc-url")).startsWith("automerge:"))

  await a.fill("#text", "added in page A")
  await a.click("#add button")
  check("an item added in page A shows in page B", await shows(b, "added in page A"))
  const onN2 = await until("n2 has it", async () => {
    const d = await doc(api2)
    return d.items?.find((i) => i.text === "added in page A")
  })
  check("and on n2 over HTTP, as a JSON string", typeof onN2?.text === "string", JSON.stringify(onN2))

  const ops = [{ op: "insert", path: "/items/-", value: { text: "from curl on n2", done: false } }]
  const r = await fetch(`${api2}/v1/docs/todos%2Fshared/ops`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(ops) })
  check("an HTTP write on n2 is taken", r.ok, String(r.status))
  check("and shows in page A (through n1)", await shows(a, "from curl on n2"))

  await b.check('#items li[data-text="written over HTTP on n1"] input', { timeout: 10_000 }).catch((e) => errors.push(e.message.split("\n")[0]))
  const done = await until("n1 sees the item done", async () => (await doc(api1)).items?.find((i) => i.text === "written over HTTP on n1")?.done)
  check("ticking an item done in page B reaches n1", done === true)
  check("and page A", await until("A shows it done", async () => (await items(a)).find((i) => i.text === "written over HTTP on n1")?.done))
} finally {
  await browser.close()
}
check("no script errors and no request off loopback", errors.length === 0, errors.join("; "))
if (failures.length) {
  console.error(`browser-check: ${failures.length} check(s) failed: ${failures.join("; ")}`)
  process.exit(1)
}
console.log("browser-check: all checks passed")
