// qsmnode's Parametric Maps in OHIF 3.13: the map's own window, and a diverging colour map
// centred on 0 for a signed quantity (χ in ppm), 0 transparent so the anatomy shows.
//
// A site appends this file to OHIF's app-config.js (after `window.config = {...};`). It changes
// nothing in OHIF itself; it only sets the display properties of Parametric Map layers once OHIF
// has drawn them, through the Cornerstone3D API OHIF exposes as window.cornerstone.
//
// Why it is needed (OHIF 3.13.2, see docs/ohif/README.md for the files and lines):
// - OHIF multiplies every Parametric Map value by 100 when it loads the map
//   (extensions/cornerstone-dicom-pmap/src/getSopClassHandlerModule.ts, _loadParametricMap);
// - the PMAP viewport then forces the colour map 'rainbow_2', an opacity ramp that is 0 at and
//   below 0 and a window of 0..100, whatever the object says
//   (extensions/cornerstone-dicom-pmap/src/viewports/OHIFCornerstonePMAPViewport.tsx);
// - the map's Real World Value Mapping, its Frame VOI LUT and any Palette Color LUT are not read
//   (@cornerstonejs/adapters, adapters/Cornerstone/ParametricMap: getPixelData copies the stored
//   values).
// So χ of ±0.1 ppm shows as 0..10 on a 0..100 rainbow window: negative χ is transparent and
// positive χ nearly black. This script sets, in OHIF's scale (stored value × 100), the window of
// the map's own Frame VOI LUT and, for a window centred on 0, a blue (negative) – red (positive)
// colour map, transparent near 0. Other maps (R2*) keep OHIF's colour map, with their window. Values OHIF shows stay × 100, as its own notice says (see docs/ohif/README.md).
(function qsmnodeParametricMaps() {
  'use strict';
  const COLORMAP = 'qsmnode_diverging';
  const done = new WeakMap(); // volume actor -> the colour transfer function set here

  const first = value => (Array.isArray(value) ? value[0] : value);
  const number = value => Number(first(value));

  function registerColormap(cs) {
    const colormaps = cs.utilities.colormap;
    if (colormaps.getColormap(COLORMAP)) return;
    colormaps.registerColormap({
      Name: COLORMAP, name: COLORMAP, ColorSpace: 'RGB',
      // x from -1 (bottom of the window) to 1 (top): dark blue, blue, light blue, white (0,
      // transparent anyway), orange, red, dark red; saturated from a tenth of the half-window
      // on, as tissue χ is a small part of it
      RGBPoints: [-1, 0.0, 0.0, 0.8, -0.5, 0.0, 0.25, 1.0, -0.1, 0.0, 0.5, 1.0, 0, 1.0, 1.0, 1.0,
                  0.1, 1.0, 0.5, 0.0, 0.5, 1.0, 0.15, 0.0, 1, 0.8, 0.0, 0.0],
    });
  }

  function mapping(instance) {
    // the Parametric Map's window (its Frame VOI LUT, in the shared functional groups)
    const shared = first(instance.SharedFunctionalGroupsSequence) || {};
    const voi = first(shared.FrameVOILUTSequence) || {};
    return {centre: number(voi.WindowCenter), width: number(voi.WindowWidth)};
  }

  function properties(map) {
    // in OHIF's scale: the stored value × 100
    const lower = 100 * (map.centre - map.width / 2);
    const upper = 100 * (map.centre + map.width / 2);
    if (!(Math.abs(map.centre) < 1e-9)) return {voiRange: {lower, upper}};
    // signed: transparent within 1/30 of the half-window around 0 (±0.005 ppm for qsmnode's
    // ±0.15 ppm), 0.9 from 1/10 of it (±0.015 ppm) outwards. (OHIF 3.13.2 draws the overlay
    // much fainter than these opacities: pastel colours; see docs/ohif/README.md.)
    const half = 100 * map.width / 2;
    const opacity = [
      {value: -half, opacity: 1}, {value: -half / 10, opacity: 0.9},
      {value: -half / 30, opacity: 0}, {value: half / 30, opacity: 0},
      {value: half / 10, opacity: 0.9}, {value: half, opacity: 1},
    ];
    return {colormap: {name: COLORMAP, opacity}, voiRange: {lower, upper}};
  }

  function apply() {
    const cs = window.cornerstone;
    const services = window.services;
    if (!cs || !services || !cs.getEnabledElements) return;
    registerColormap(cs);
    for (const enabled of cs.getEnabledElements()) {
      const viewport = enabled.viewport;
      if (!viewport || !viewport.getActors) continue;
      for (const entry of viewport.getActors()) {
        // OHIF's volume id: <loader scheme>:<display set UID>
        const volumeId = entry.referencedId || entry.uid;
        const uid = String(volumeId).split(':').pop();
        const displaySet = services.displaySetService.getDisplaySetByUID(uid);
        if (!displaySet || displaySet.Modality !== 'PMAP' || !displaySet.isLoaded) continue;
        const map = mapping(displaySet.instance);
        if (!Number.isFinite(map.centre) || !(map.width > 0)) continue;
        const wanted = properties(map);
        const cfun = entry.actor.getProperty().getRGBTransferFunction(0);
        const range = cfun && cfun.getMappingRange ? cfun.getMappingRange() : null;
        const same = done.get(entry.actor) === cfun && range
          && Math.abs(range[0] - wanted.voiRange.lower) < 1e-9
          && Math.abs(range[1] - wanted.voiRange.upper) < 1e-9;
        if (same) continue;
        viewport.setProperties(wanted, volumeId);
        done.set(entry.actor, entry.actor.getProperty().getRGBTransferFunction(0));
        viewport.render();
      }
    }
  }

  setInterval(() => {
    try {
      apply();
    } catch (error) {
      console.error('qsmnode-pmap: ' + error);
    }
  }, 500);
})();
