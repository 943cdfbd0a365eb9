// Drive the MLflow UI in headless Chromium and report what a user sees; the Python test asserts.
//
// Usage: node mlflow_ui.js '<json>' with keys
//   url          the experiment's runs page, e.g. http://127.0.0.1:PORT/#/experiments/1/runs
//   parent       the parent run's name (its row holds the button that unfolds the child runs)
//   children     the child runs' names
//   open_child   the child run whose page is opened from its link in the table
//   screenshot   PNG of the runs table with the parent unfolded
//   child_shot   PNG of the child run's page
//   user_data    a fresh, empty Chromium profile folder
//   chromium     the browser binary (Debian's chromium: no browser download)
// Prints one JSON line: the run names listed before and after unfolding the parent, and the text
// of the child run's page.
'use strict';

const { open, runNames, run } = require('./browser');

async function drive(opts) {
  const { context, page } = await open(opts);
  try {
    const parentRow = page.locator('[role=row]', { hasText: opts.parent }).first();
    await parentRow.waitFor();
    // The assistant side panel opens by default and hides the right half of the table.
    const close = page.getByRole('button', { name: 'Close', exact: true });
    if (await close.count()) await close.first().click();
    const before = await runNames(page);

    await parentRow.locator('button[data-component-id*="runnamecellrenderer"]').first().click();
    for (const name of opts.children) {
      await page.locator('[role=row]', { hasText: name }).first().waitFor();
    }
    const after = await runNames(page);
    await page.screenshot({ path: opts.screenshot });

    await page.getByRole('link', { name: opts.open_child, exact: true }).first().click();
    // The run's details load one by one; wait for the parent's name (a link to its run).
    await page.getByRole('link', { name: opts.parent, exact: true }).first().waitFor();
    await page.getByText(opts.open_child, { exact: true }).first().waitFor();
    await page.getByText('Parameters (', { exact: false }).first().waitFor();
    const childText = await page.evaluate(() => document.body.innerText);
    await page.screenshot({ path: opts.child_shot });
    return { before, after, child_text: childText };
  } finally {
    await context.close();
  }
}

run(drive);
