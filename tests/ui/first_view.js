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

const { open, runNames, run } = require('./browser');

async function drive(opts) {
  const { context, page } = await open(opts);
  try {
    await page.locator('[role=row]', { hasText: opts.run }).first().waitFor();
    await page.screenshot({ path: opts.screenshot });
    const runs = await runNames(page);
    const headers = (await page.locator('[role=columnheader]').allInnerTexts())
      .map((t) => t.trim()).filter((t) => t);
    const text = await page.evaluate(() => document.body.innerText);
    return { runs, headers, text };
  } finally {
    await context.close();
  }
}

run(drive);
