// What both UI drivers share: headless Debian Chromium with a fresh profile, the runs table's
// run names, and the one-JSON-line / exit-1-with-stack protocol the Python tests read.
'use strict';

const { chromium } = require('playwright-core');

const TIMEOUT_MS = 30000;

// Open opts.url in a new headless browser; returns { context, page }.
async function open(opts) {
  const context = await chromium.launchPersistentContext(opts.user_data, {
    executablePath: opts.chromium,
    headless: true,
    viewport: { width: 1600, height: 800 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(TIMEOUT_MS);
  await page.goto(opts.url, { waitUntil: 'load' });
  return { context, page };
}

// The run names listed in the runs table. A cell reads "#colour\nname"; the header's, "Run Name".
async function runNames(page) {
  const cells = page.locator('[role=row] [col-id="attributes.`Run Name`"]');
  const texts = await cells.allInnerTexts();
  return texts.map((t) => t.split('\n').pop().trim()).filter((t) => t && t !== 'Run Name');
}

// Run drive(opts) on the JSON of argv[2]; print its result as one JSON line, or the error and
// exit 1.
function run(drive) {
  drive(JSON.parse(process.argv[2]))
    .then((result) => process.stdout.write(`${JSON.stringify(result)}\n`))
    .catch((err) => {
      process.stderr.write(`${err.stack || err}\n`);
      process.exit(1);
    });
}

module.exports = { open, runNames, run };
