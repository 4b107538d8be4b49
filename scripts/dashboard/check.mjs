// Drives Debian's Chromium (headless, through playwright-core) against a
// running node and checks what a person would see; see ../dashboard-check.sh.
// Usage: node check.mjs <api base> <token> <hook port> <screenshot path>
import { chromium } from "playwright-core";
import http from "node:http";

const [base, token, hookPort, shot] = process.argv.slice(2);
const failures = [];
function check(what, ok, detail = "") {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}${detail ? ": " + detail : ""}`);
  if (!ok) failures.push(what);
}
async function api(path, opts = {}) {
  const resp = await fetch(base + path, { ...opts, headers: { Authorization: "Bearer " + token, "Content-Type": "application/json", ...(opts.headers || {}) } });
  return resp.json();
}

const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
const outside = [];
page.on("request", (r) => { if (!r.url().startsWith(base)) outside.push(r.url()); });
const consoleErrors = [];
page.on("console", (m) => { if (m.type() === "error" && !m.text().includes("401")) consoleErrors.push(m.text()); });

await page.goto(base + "/");
await page.waitForSelector("#login-form", { state: "visible" });
check("the page asks for the API token", await page.isVisible("#token"));
await page.fill("#token", "wrong-token-0123456789");
await page.click("#login-form button");
await page.waitForFunction(() => document.getElementById("login-error").textContent.includes("refused"));
check("a wrong token is refused", true);
await page.fill("#token", token);
await page.click("#login-form button");

const status = await api("/v1/status");
await page.waitForFunction((id) => document.getElementById("peer-id").textContent === id, status.peer_id);
check("node identity shown", true, status.peer_id);
const nodeText = await page.textContent("#node");
check("listen addresses shown", status.listen_addrs.every((a) => nodeText.includes(a)));
await page.waitForFunction(() => document.getElementById("live").textContent === "live");
check("live updates connected", true);

// Peers: the second node.
await page.waitForSelector("#peers tr[data-peer] .pill.ok", { timeout: 30000 });
const peerRow = await page.textContent("#peers tr[data-peer]");
check("peer shown as connected with its sync state", peerRow.includes("connected"), peerRow.trim().replace(/\s+/g, " "));

// Documents: search, then one doc's JSON and history.
await page.waitForSelector('#docs tr[data-doc="sensors/gh-1"]');
const allDocs = await page.$$eval("#docs tr", (rows) => rows.length);
await page.fill("#doc-filter", "notes/");
const filtered = await page.$$eval("#docs tr", (rows) => rows.map((r) => r.dataset.doc));
check("document search filters the list", filtered.length > 0 && filtered.length < allDocs && filtered.every((d) => d.startsWith("notes/")), `${filtered.length} of ${allDocs}`);
await page.fill("#doc-filter", "sensors/");
await page.click('#docs tr[data-doc="sensors/gh-1"]');
await page.waitForFunction(() => document.getElementById("doc-json").textContent.includes("celsius"));
const docJson = JSON.parse(await page.textContent("#doc-json"));
check("document JSON shown", docJson.celsius === 45, JSON.stringify(docJson));
const historyRows = await page.$$eval("#doc-history tbody tr", (rows) => rows.length);
check("document history shown", historyRows >= 1, `${historyRows} changes`);
await api("/v1/docs/sensors%2Fgh-1", { method: "PATCH", body: JSON.stringify({ note: "edited while watching" }) });
await page.waitForFunction(() => document.getElementById("doc-json").textContent.includes("edited while watching"), null, { timeout: 15000 });
check("an edit elsewhere shows up live", true);

// Runs: the failed one first, with its step error; retry it.
await page.waitForSelector('#runs tr[data-status="dead"]');
const first = await page.$eval("#runs tr", (r) => ({ status: r.dataset.status, id: r.dataset.run, text: r.textContent }));
check("the failed run is listed first", first.status === "dead", `run ${first.id}`);
check("its step error is shown", /failed/.test(first.text) && /error|refused|connect/i.test(first.text), first.text.trim().replace(/\s+/g, " ").slice(0, 200));
const hooks = [];
const receiver = http.createServer((req, res) => { hooks.push(req.headers["idempotency-key"]); req.resume(); res.end("ok"); });
await new Promise((r) => receiver.listen(Number(hookPort), "127.0.0.1", r));
await page.screenshot({ path: shot, fullPage: true });
await page.click(`#runs tr[data-run="${first.id}"] button[data-action="retry"]`);
await page.waitForSelector(`#runs tr[data-run="${first.id}"][data-status="done"]`, { timeout: 30000 });
check("retry click: the run is done, live", true);
check("the receiver got the alert once", hooks.length === 1, `${hooks.length} calls`);
const after = await page.$eval(`#runs tr[data-run="${first.id}"]`, (r) => r.textContent);
check("no retry button on a done run", !after.includes("Retry"));

check("no request left this node", outside.length === 0, outside.join(", "));
check("no script errors", consoleErrors.length === 0, consoleErrors.join(" | "));
receiver.close();
await browser.close();
if (failures.length) {
  console.log(`${failures.length} checks failed`);
  process.exit(1);
}
console.log("all dashboard checks passed; screenshot: " + shot);
