// Open one URL in headless Chromium and report what a user sees first: the run names listed in
// the runs table, the column headers inside the window, and the cells of one run's row. The
// Python test asserts.
//
// Usage: node first_view.js '<json>' with keys
//   url          exactly the link hmaml printed
//   run          a run name that must appear in the table (waited for)
//   column       a column header to wait for (a few seconds; the test asserts it is there)
//   screenshot   PNG of the page as first seen
//   user_data    a fresh, empty Chromium profile folder
//   chromium     the browser binary (Debian's chromium: no browser download)
// Prints one JSON line: {url, runs, headers, cells, text}; cells maps the col-id of each cell
// of the run's row (e.g. "metrics.`test_acc`") to its text.
'use strict';

const { open, runNames, run } = require('./browser');

const COLUMN_WAIT_MS = 10000;

async function drive(opts) {
  const { context, page } = await open(opts);
  try {
    const row = page.locator('[role=row][row-id]', { hasText: opts.run }).first();
    await row.waitFor();
    if (opts.column) {
      // the saved view arrives with the experiment's tags, maybe after the first rows
      await page.locator('[role=columnheader]', { hasText: opts.column }).first()
        .waitFor({ timeout: COLUMN_WAIT_MS }).catch(() => {});
    }
    await page.screenshot({ path: opts.screenshot });
    const runs = await runNames(page);
    // headers a user sees without scrolling: inside the window, not merely in the page
    const headers = await page.locator('[role=columnheader]').evaluateAll((els) => els
      .filter((el) => {
        const box = el.getBoundingClientRect();
        return box.width > 0 && box.height > 0 && box.left >= 0 && box.top >= 0
          && box.right <= window.innerWidth && box.bottom <= window.innerHeight;
      })
      .map((el) => el.innerText.trim()).filter((t) => t));
    // the grid splits a row into pinned and scrolling parts that share its row-id
    const rowId = await row.getAttribute('row-id');
    const cells = {};
    for (const part of await page.locator(`[role=row][row-id="${rowId}"]`).all()) {
      for (const [col, text] of await part.locator('[col-id]').evaluateAll((els) => els
        .map((el) => [el.getAttribute('col-id'), el.innerText.trim()]))) {
        cells[col] = text;
      }
    }
    const text = await page.evaluate(() => document.body.innerText);
    return { url: page.url(), runs, headers, cells, text };
  } finally {
    await context.close();
  }
}

run(drive);
