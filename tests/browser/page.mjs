// The live ward page in headless Chromium (Debian's), driven by tests/browser.rs.
//   VS_PAGE   the page's URL with ?token=…
// Prints one JSON line per step; exits 0 when a live alert appeared and was acknowledged.
import { chromium } from "playwright-core";

const say = (step, data = {}) => console.log(JSON.stringify({ step, ...data }));
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  page.on("pageerror", (e) => say("page_error", { message: e.message }));
  await page.goto(process.env.VS_PAGE);
  await page.waitForFunction(() => document.getElementById("status").textContent === "live", null, { timeout: 15000 });
  say("ready");
  const alert = page.locator(".alert.high").first();
  await alert.waitFor({ timeout: 15000 });
  say("alert_shown", { text: await alert.innerText(), id: await alert.getAttribute("data-alert-id") });
  await alert.getByRole("button", { name: "Acknowledge" }).click();
  await page.locator(".alert.high.acknowledged").first().waitFor({ timeout: 15000 });
  say("acknowledged", { text: await page.locator(".alert.high").first().innerText() });
  const rows = await page.locator("#patients tr").count();
  say("patients", { rows });
  await browser.close();
  process.exit(0);
} catch (e) {
  say("failed", { message: String(e) });
  await browser.close();
  process.exit(1);
}
