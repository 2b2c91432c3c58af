// Drive OHIF in headless Chromium for tests/test_viewer_ohif.py.
//
// node drive-ohif.mjs URL PLAN_JSON OUT_DIR CHROMIUM
//
// PLAN: {"series": [{"name": <series description>, "key": <file stem>, "before": [<series
// description shown first>, ...], "query": <appended to URL>, "panel": <data-cy of a panel tab
// to open>, "prompt": <true: the series asks to be loaded; wait for the prompt>, "clickAfter": <text to click then, e.g. a segment>, "waitForColour": <true (or "tinted": pastel colour will do): wait until the viewport shows colour, scrolling a slice on and back every 5 s>, "probes": [<values: report each volume layer's colour and opacity at them>]}, ...], "waitMs": N}.
// For each series, in a fresh page at URL (an OHIF /viewer?StudyInstanceUIDs=... address):
// skip the tour, double-click the series' thumbnail in the study browser, accept a load prompt
// when one comes, wait for the network and the viewport to settle, then record the console
// messages, the text of the viewport and side panels, the viewport canvas' pixel statistics and
// a screenshot (OUT_DIR/<key>.png). Prints one JSON line: {"series": {key: report}}.
import fs from 'node:fs';
import puppeteer from 'puppeteer-core';

const [url, planText, outDir, chromium] = process.argv.slice(2);
const plan = JSON.parse(planText);
const waitMs = plan.waitMs ?? 3000;
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

async function clickText(page, texts) {
  // Click the first visible button (or clickable element) whose text is one of `texts`.
  return page.evaluate(wanted => {
    const items = Array.from(document.querySelectorAll('button, [role="button"], a, span, div'));
    for (const el of items) {
      const text = (el.innerText || '').trim();
      if (!wanted.includes(text) || el.offsetParent === null) continue;
      if (el.children.length > 2) continue;
      el.click();
      return text;
    }
    return null;
  }, texts);
}

async function thumbnail(page, name) {
  const handles = await page.$$('[data-cy^="study-browser-thumbnail"]');
  for (const handle of handles) {
    const label = await handle.$eval('[data-cy="series-description-label"]', e => e.innerText.trim())
      .catch(() => null);
    if (label === name) return handle;
  }
  return null;
}

async function settle(page) {
  await page.waitForNetworkIdle({idleTime: 1500, timeout: 60000}).catch(() => {});
  await sleep(waitMs);
}

function canvasStats() {
  // Pixel statistics of the largest viewport canvas (Cornerstone draws each viewport on a 2-D
  // canvas), and a 16 x 16 grey thumbnail to compare viewports.
  const canvases = Array.from(document.querySelectorAll('.viewport-element canvas, canvas.cornerstone-canvas'));
  let best = null;
  for (const c of canvases) if (!best || c.width * c.height > best.width * best.height) best = c;
  if (!best || !best.width) return null;
  const ctx = best.getContext('2d');
  if (!ctx) return {width: best.width, height: best.height, error: 'no 2d context'};
  const {data, width, height} = ctx.getImageData(0, 0, best.width, best.height);
  // coloured: a channel spread over 40 (of 255); tinted: over 20, with reddish and bluish
  // (red minus blue, blue minus red, over 20): a pastel overlay
  let lit = 0, coloured = 0, tinted = 0, reddish = 0, bluish = 0, sum = 0;
  const grid = new Array(256).fill(0), counts = new Array(256).fill(0);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = 4 * (y * width + x);
      const r = data[i], g = data[i + 1], b = data[i + 2];
      const grey = (r + g + b) / 3;
      sum += grey;
      if (grey > 20) lit++;
      const spread = Math.max(r, g, b) - Math.min(r, g, b);
      if (spread > 40) coloured++;
      if (spread > 20) tinted++;
      if (r - b > 20) reddish++;
      if (b - r > 20) bluish++;
      const cell = Math.floor(16 * y / height) * 16 + Math.floor(16 * x / width);
      grid[cell] += grey; counts[cell]++;
    }
  }
  const n = width * height;
  return {width, height, litFraction: lit / n, colouredFraction: coloured / n,
          tintedFraction: tinted / n, reddishFraction: reddish / n, bluishFraction: bluish / n,
          mean: sum / n,
          grid: grid.map((v, i) => Math.round(v / Math.max(counts[i], 1)))};
}

function panelText() {
  const pick = sel => Array.from(document.querySelectorAll(sel)).map(e => e.innerText).join('\n');
  return {
    viewport: pick('[data-cy="viewport-pane"]'),
    panels: pick('[data-cy="side-panel-header-right"], .ohif-scrollbar, [data-cy*="panel"], [class*="SidePanel"]'),
    body: document.body.innerText,
  };
}

function ohifState() {
  // What OHIF's services hold (window.services, as OHIF exposes them): display sets, the
  // measurements of the measurement service and the segments of the segmentation service.
  const services = window.services;
  if (!services) return null;
  const out = {displaySets: [], measurements: [], segments: []};
  for (const ds of services.displaySetService.getActiveDisplaySets()) {
    out.displaySets.push({modality: ds.Modality, series: ds.SeriesNumber, loaded: ds.isLoaded ?? null,
      srMeasurements: (ds.measurements || []).map(m => ({id: m.TrackingIdentifier, loaded: m.loaded,
        labels: (m.labels || []).map(l => `${l.label}: ${l.value}`)}))});
  }
  for (const m of services.measurementService.getMeasurements()) {
    out.measurements.push({label: m.label, toolName: m.toolName, displayText: m.displayText,
      referenceSeriesUID: m.referenceSeriesUID});
  }
  const segService = services.segmentationService;
  for (const seg of (segService.getSegmentations ? segService.getSegmentations() : [])) {
    for (const [index, segment] of Object.entries(seg.segments || {})) {
      if (segment) out.segments.push({index: Number(index), label: segment.label});
    }
  }
  return out;
}

async function show(page, name) {
  // double-click the series' thumbnail until the active viewport holds it (OHIF may drop a
  // double-click that comes while it is still busy with the previous series): at most 3 tries,
  // 15 s each
  for (let attempt = 0; attempt < 3; attempt++) {
    const thumb = await thumbnail(page, name);
    if (!thumb) return false;
    await thumb.click({count: 2});
    for (let t = 0; t < 15; t++) {
      await sleep(1000);
      const grid = await page.evaluate(viewportSeries).catch(() => []);
      if (grid.some(v => v.active && v.series.some(x => x.endsWith(`:${name}`)))) return true;
    }
  }
  return false;
}

async function scrollOneSlice(page) {
  // the mouse wheel over the viewport, one slice on and back, as a radiologist does when an
  // overlay has not appeared: Cornerstone draws again (OHIF 3.13 may load an overlay's volume
  // after its last draw and show it only on the next one)
  const pane = await page.$('[data-cy="viewport-pane"]');
  const box = pane && await pane.boundingBox();
  if (!box) return;
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.mouse.wheel({deltaY: 120});
  await sleep(500);
  await page.mouse.wheel({deltaY: -120});
}

function hasColour(stats, how) {
  // how: true (coloured) or 'tinted' (a pastel overlay)
  return !!stats && (how === 'tinted' ? stats.tintedFraction : stats.colouredFraction) > 0;
}

async function waitForColour(page, seconds, how) {
  // an overlay is drawn once its volume has loaded: poll the viewport, scrolling a slice on and
  // back every 5 s without colour
  for (let t = 1; t <= seconds; t++) {
    const stats = await page.evaluate(canvasStats);
    if (hasColour(stats, how)) break;
    await sleep(1000);
    if (t % 5 === 0) await scrollOneSlice(page);
  }
  await sleep(1000);
}

function volumeLayers(probes) {
  // Each volume layer Cornerstone draws (window.cornerstone, as OHIF exposes it): its volume,
  // the range of the values it holds, its VOI range and colour map, and, at each probe value,
  // the colour (RGB 0..1) and opacity its transfer functions give, i.e. what a voxel of that
  // value looks like in the viewport
  const cs = window.cornerstone;
  if (!cs || !cs.getEnabledElements) return null;
  const out = [];
  for (const enabled of cs.getEnabledElements()) {
    const viewport = enabled.viewport;
    if (!viewport || !viewport.getActors) continue;
    for (const entry of viewport.getActors()) {
      const volumeId = entry.referencedId || entry.uid;
      const layer = {viewportId: viewport.id, type: viewport.type, volumeId};
      try {
        const props = viewport.getProperties(volumeId) || {};
        layer.voiRange = props.voiRange || null;
        layer.colormap = props.colormap ? {name: props.colormap.name ?? null,
                                           opacity: props.colormap.opacity ?? null} : null;
      } catch (e) { layer.propertiesError = String(e); }
      const volume = cs.cache.getVolume(volumeId) || cs.cache.getVolume(String(volumeId).split(':').pop());
      try {
        const data = volume && volume.voxelManager.getCompleteScalarDataArray();
        if (data) {
          let lo = Infinity, hi = -Infinity;
          for (let i = 0; i < data.length; i++) { const v = data[i]; if (v < lo) lo = v; if (v > hi) hi = v; }
          layer.min = lo; layer.max = hi;
        }
      } catch (e) { layer.dataError = String(e); }
      try {
        const property = entry.actor.getProperty();
        const colours = property.getRGBTransferFunction(0);
        const opacity = property.getScalarOpacity(0);
        layer.probes = (probes || []).map(value => {
          const rgb = [0, 0, 0];
          colours.getColor(value, rgb);
          return {value, rgb: rgb.map(c => Math.round(c * 1000) / 1000),
                  opacity: Math.round(opacity.getValue(value) * 1000) / 1000};
        });
      } catch (e) { layer.probeError = String(e); }
      out.push(layer);
    }
  }
  return out;
}

function viewportSeries() {
  // what each viewport of OHIF's grid holds: "<Modality>:<SeriesDescription>" per display set
  const services = window.services;
  const state = services.viewportGridService.getState();
  const out = [];
  for (const [id, viewport] of state.viewports) {
    out.push({id, active: id === state.activeViewportId,
      series: (viewport.displaySetInstanceUIDs || []).map(uid => {
        const ds = services.displaySetService.getDisplaySetByUID(uid);
        return ds ? `${ds.Modality}:${ds.SeriesDescription}` : uid;
      })});
  }
  return out;
}

const browser = await puppeteer.launch({
  executablePath: chromium,
  headless: true,
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
         '--disable-dev-shm-usage', '--window-size=1600,1000'],
  defaultViewport: {width: 1600, height: 1000},
});
const report = {series: {}};
async function runItem(item) {
    const page = await browser.newPage();
    const consoleLines = [];
    page.on('console', m => { if (m.type() !== 'debug') consoleLines.push(`${m.type()}: ${m.text()}`); });
    page.on('pageerror', e => consoleLines.push(`pageerror: ${e.message}`));
    const entry = {name: item.name, console: consoleLines, clicked: []};
    report.series[item.key] = entry;  // a second try replaces the first
    await page.goto(url + (item.query || ''), {waitUntil: 'networkidle2', timeout: 120000});
    await page.waitForSelector('[data-cy^="study-browser-thumbnail"]', {timeout: 60000});
    await settle(page);
    entry.clicked.push(await clickText(page, ['Skip all']));
    for (const first of item.before || []) {
      // series to show first (the viewport type OHIF keeps for the next series)
      if (!await show(page, first)) entry.error = `${first} never reached the viewport`;
      await settle(page);
    }
    if (!await thumbnail(page, item.name)) {
      entry.error = `no thumbnail named ${item.name}`; await page.close(); return entry;
    }
    const before = consoleLines.length;
    if (!await show(page, item.name)) entry.error = `${item.name} never reached the viewport`;
    await settle(page);
    const prompts = ['Yes', 'Load', 'LOAD', 'Load Segmentation', 'Track'];
    for (let i = 0; i < 3; i++) {
      let clicked = await clickText(page, prompts);
      // a series that asks to be loaded (item.prompt): wait for its prompt (at most 20 s)
      for (let t = 0; !clicked && i === 0 && item.prompt && t < 40; t++) {
        await sleep(500);
        clicked = await clickText(page, prompts);
      }
      if (!clicked) break;
      entry.clicked.push(clicked);
      await settle(page);
    }
    if (item.waitForColour) await waitForColour(page, 90, item.waitForColour);
    if (item.panel) {
      // open a right-hand panel (e.g. the measurements) by its tab
      entry.dataCy = await page.evaluate(() => Array.from(document.querySelectorAll('[data-cy]'))
        .map(e => e.getAttribute('data-cy')));
      const opened = await page.evaluate(wanted => {
        const el = Array.from(document.querySelectorAll('[data-cy]'))
          .find(e => e.getAttribute('data-cy').toLowerCase().includes(wanted));
        if (!el) return null;
        el.click();
        return el.getAttribute('data-cy');
      }, item.panel.toLowerCase());
      entry.clicked.push(opened);
      await sleep(3000);
    }
    if (item.clickAfter) {
      // e.g. a segment or measurement in the panel: OHIF jumps to its slice
      entry.clicked.push(await clickText(page, [item.clickAfter]));
      await settle(page);
      if (item.waitForColour) await waitForColour(page, 30, item.waitForColour);
    }
    entry.viewports = await page.evaluate(viewportSeries).catch(e => ({error: String(e)}));
    if (item.probes) entry.layers = await page.evaluate(volumeLayers, item.probes).catch(e => ({error: String(e)}));
    entry.consoleAfterLoad = consoleLines.slice(before);
    entry.canvas = await page.evaluate(canvasStats);
    entry.text = await page.evaluate(panelText);
    entry.ohif = await page.evaluate(ohifState).catch(e => ({error: String(e)}));
    await page.screenshot({path: `${outDir}/${item.key}.png`});
    entry.screenshot = `${outDir}/${item.key}.png`;
    await page.close();
    return entry;
}

try {
  for (const item of plan.series) {
    let entry = await runItem(item);
    if (item.waitForColour && !entry.error && !hasColour(entry.canvas, item.waitForColour)) {
      // the overlay never showed (OHIF, busy, may put it on another series): reload the
      // viewer and load it again, once, as a radiologist would; the report says so
      const first = entry;
      entry = await runItem(item);
      entry.retried = {viewports: first.viewports, canvas: first.canvas, clicked: first.clicked,
                       consoleAfterLoad: first.consoleAfterLoad, viewportText: first.text?.viewport,
                       ohif: first.ohif};
    }
  }
} finally {
  await browser.close();
}
fs.writeFileSync(`${outDir}/report.json`, JSON.stringify(report, null, 1));
console.log(JSON.stringify(report));
