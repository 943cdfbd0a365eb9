// Open one URL in headless Chromium and report what a user sees first: the run names listed in
// the runs table and its column headers. The Python test asserts.
//
// Usage: node first_view.js '<json>' with keys
//   url          exactly the link hmaml printed
//   run          a run name that must appear in the table (waited for)
//   screenshot   PNG of the page as first seen
//   user_data    a fresh, empty Chromium profile folder
//   chromium     the browser binary (Debian's chromium: no browser download)
// Prints one JSON line: {runs, headers, text}.
'use strict';

const { chromium } = require('playwright-core');

const TIMEOUT_MS = 30000;

async function main() {
  const opts = JSON.parse(process.argv[2]);
  const context = await chromium.launchPersistentContext(opts.user_data, {
    executablePath: opts.chromium,
    headless: true,
    viewport: { width: 1600, height: 800 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = context.pages()[0] || (await context.newPage());
    page.setDefaultTimeout(TIMEOUT_MS);
    await page.goto(opts.url, { waitUntil: 'load' });
    await page.locator('[role=row]', { hasText: opts.run }).first().waitFor();
    await page.screenshot({ path: opts.screenshot });
    const names = await page.locator('[role=row] [col-id="attributes.`Run Name`"]').allInnerTexts();
    const runs = names.map((t) => t.split('\n').pop().trim()).filter((t) => t && t !== 'Run Name');
    const headers = (await page.locator('[role=columnheader]').allInnerTexts())
      .map((t) => t.trim()).filter((t) => t);
    const text = await page.evaluate(() => document.body.innerText);
    process.stdout.write(`${JSON.stringify({ runs, headers, text })}\n`);
  } finally {
    await context.close();
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
