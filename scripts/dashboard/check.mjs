// Drives Debian's Chromium (headless, through playwright-core) against a
// running node and checks what a person would see; see ../dashboard-check.sh.
// Usage: node check.mjs <api base> <token> <hook port> <screenshot path> <viewer token>
import { chromium } from "playwright-core";
import http from "node:http";

const [base, token, hookPort, shot, viewer] = process.argv.slice(2);
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

// Peers: the second node, by its label, with its addresses.
await page.waitForSelector("#peers tr[data-peer] .pill.ok", { timeout: 30000 });
await page.waitForFunction(() => document.getElementById("peers").textContent.includes("field-relay"), null, { timeout: 30000 });
const peerRow = await page.textContent("#peers tr[data-peer]");
check("peer shown as connected, named by its label, with its sync state", peerRow.includes("connected") && peerRow.includes("field-relay"), peerRow.trim().replace(/\s+/g, " "));
check("peer addresses shown", /\/ip4\/127\.0\.0\.1\/tcp\//.test(peerRow));
check("this node's labels shown", (await page.textContent("header")).includes("greenhouse-gw"));
check("uptime in human units", /up \d+ (s|min|h)/.test(await page.textContent("#summary")), await page.textContent("#summary"));

// Documents: a prefix filter (asked of the node), then one doc's JSON and history.
await page.waitForSelector('#docs tr[data-doc="sensors/gh-1"]');
const allDocs = await page.$$eval("#docs tr", (rows) => rows.length);
await page.fill("#doc-filter", "notes/");
await page.waitForFunction(() => { const r = [...document.querySelectorAll("#docs tr[data-doc]")]; return r.length && r.every((x) => x.dataset.doc.startsWith("notes/")); });
const filtered = await page.$$eval("#docs tr", (rows) => rows.map((r) => r.dataset.doc));
check("the prefix filter lists only those docs", filtered.length === 3 && filtered.length < allDocs, `${filtered.length} of ${allDocs}`);
check("system docs stay hidden", !(await page.textContent("#docs")).includes("_mergeflow"));
await page.fill("#doc-filter", "sensors/");
await page.waitForFunction(() => [...document.querySelectorAll("#docs tr[data-doc]")].every((x) => x.dataset.doc.startsWith("sensors/")));
await page.click('#docs tr[data-doc="sensors/gh-1"]');
await page.waitForFunction(() => document.getElementById("doc-json").textContent.includes("celsius"));
const docJson = JSON.parse(await page.textContent("#doc-json"));
check("document JSON shown", docJson.celsius === 45, JSON.stringify(docJson));
await page.waitForFunction(() => document.getElementById("doc-url").textContent.startsWith("automerge:"));
const docUrl = await page.textContent("#doc-url");
const apiUrl = (await api("/v1/docs/sensors%2Fgh-1/url")).url;
check("the doc's automerge URL shown", docUrl === apiUrl, docUrl);
const historyRows = await page.$$eval("#doc-history tbody tr", (rows) => rows.length);
check("document history shown", historyRows >= 1, `${historyRows} changes`);
await api("/v1/docs/sensors%2Fgh-1", { method: "PATCH", body: JSON.stringify({ note: "edited while watching" }) });
await page.waitForFunction(() => document.getElementById("doc-json").textContent.includes("edited while watching"), null, { timeout: 15000 });
check("an edit elsewhere shows up live", true);

// Plots: rates need two samples (2 s apart); the dead run is in the runs plot.
await page.waitForSelector("#plot-rate polyline", { state: "attached", timeout: 15000 });
check("write and merge rate plotted", true);
await page.waitForSelector("#plot-lag polyline", { state: "attached", timeout: 15000 });
check("sync lag per peer plotted", (await page.textContent("#legend-lag")).includes("field-relay"));
await page.waitForSelector('#plot-runs rect[data-outcome="dead"]', { state: "attached", timeout: 15000 });
check("run outcomes plotted", true);

// Dead runs: listed with the step error shown once; retry it.
await page.waitForSelector('#dead-runs tr[data-status="dead"]');
const first = await page.$eval("#dead-runs tr", (r) => ({ status: r.dataset.status, id: r.dataset.run, text: r.textContent }));
check("the failed run is in the dead runs list", first.status === "dead", `run ${first.id}`);
check("its step error is shown", /error|refused|connect/i.test(first.text), first.text.trim().replace(/\s+/g, " ").slice(0, 200));
const stepError = await page.$eval("#dead-runs tr .run-error", (e) => e.textContent);
const times = first.text.split(stepError).length - 1;
check("the error is shown once", times === 1, `${times} times`);
check("runs list is paged", await page.isVisible("#runs-older"));
const hooks = [];
const receiver = http.createServer((req, res) => { hooks.push(req.headers["idempotency-key"]); req.resume(); res.end("ok"); });
await new Promise((r) => receiver.listen(Number(hookPort), "127.0.0.1", r));
await page.screenshot({ path: shot, fullPage: true });
await page.click(`#dead-runs tr[data-run="${first.id}"] button[data-action="retry"]`);
await page.waitForSelector(`#runs tr[data-run="${first.id}"][data-status="done"]`, { timeout: 30000 });
check("retry click: the run is done, live", true);
check("the receiver got the alert once", hooks.length === 1, `${hooks.length} calls`);
const after = await page.$eval(`#runs tr[data-run="${first.id}"]`, (r) => r.textContent);
check("no retry button on a done run", !after.includes("Retry"));
check("the effect says which node delivered it", after.includes("delivered by this node"), after.trim().replace(/\s+/g, " ").slice(0, 200));
check("the dead list no longer holds it", !(await page.$(`#dead-runs tr[data-run="${first.id}"]`)));

// An effect both nodes run: one delivers it, and A's run says which (by
// name, never "0 attempts" when the other node did it).
const applied = await fetch(base + "/v1/workflows", { method: "POST", headers: { Authorization: "Bearer " + token, "Content-Type": "application/toml" },
  body: `name = "notify"\n[on]\ndoc = "events/*"\n[[steps]]\nid = "hook"\nkind = "http"\nurl = "http://127.0.0.1:${hookPort}/events"\n` });
check("a workflow for both nodes applied", applied.ok, String(applied.status));
// Wait until A knows that B runs it too (B's membership doc says so).
const peerB = (await api("/v1/peers"))[0].peer_id;
for (let i = 0; ; i++) {
  const runs = await api(`/v1/docs/${encodeURIComponent("_mergeflow/nodes/" + peerB)}?path=%2Fworkflows`);
  if (runs && runs.notify === true) break;
  if (i > 300) { check("node b runs the workflow", false); break; }
  await new Promise((r) => setTimeout(r, 100));
}
await api("/v1/docs/events%2F1", { method: "PATCH", body: JSON.stringify({ what: "door opened" }) });
await page.waitForFunction(() => [...document.querySelectorAll("#runs tr")].some((r) => r.textContent.includes("notify") && r.dataset.status === "done"), null, { timeout: 30000 });
const notify = await page.$$eval("#runs tr", (rows) => rows.find((r) => r.textContent.includes("notify")).textContent);
check("the run names the node that delivered its effect", /delivered by (this node|field-relay)/.test(notify) && !notify.includes("0 attempts"), notify.trim().replace(/\s+/g, " ").slice(0, 200));

// A scoped token ([[api.tokens]] viewer: events/** only) sees its docs and
// is told, not failed, where it may not look.
const scoped = await browser.newPage({ viewport: { width: 1280, height: 1000 } });
scoped.on("console", (m) => { if (m.type() === "error" && !/\b40[13]\b/.test(m.text())) consoleErrors.push(m.text()); });
await scoped.goto(base + "/");
await scoped.waitForSelector("#login-form", { state: "visible" });
await scoped.fill("#token", viewer);
await scoped.click("#login-form button");
await scoped.waitForSelector("#docs tr[data-doc]", { timeout: 30000 });
const shownDocs = await scoped.$$eval("#docs tr[data-doc]", (rows) => rows.map((r) => r.dataset.doc));
check("a scoped token lists only the docs it may read", shownDocs.length > 0 && shownDocs.every((d) => d.startsWith("events/")), shownDocs.join(", "));
await scoped.waitForFunction(() => document.querySelector("#peers .scoped") !== null, null, { timeout: 30000 });
check("a scoped token is told peers need the admin token", true);
const banner = await scoped.$eval("#error", (e) => getComputedStyle(e).display === "none" ? "" : e.textContent);
check("no error banner for a scoped token", banner === "", banner);
await scoped.close();

check("no request left this node", outside.length === 0, outside.join(", "));
check("no script errors", consoleErrors.length === 0, consoleErrors.join(" | "));
receiver.close();
await browser.close();
if (failures.length) {
  console.log(`${failures.length} checks failed`);
  process.exit(1);
}
console.log("all dashboard checks passed; screenshot: " + shot);
