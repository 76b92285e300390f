// sessiongate console: refreshes the counters every 2 s without a reload.
// Everything else works without this script (plain forms, POST-redirect-GET).
(function () {
  "use strict";
  var box = document.getElementById("counters");
  if (!box || !window.fetch) { return; }
  var src = box.getAttribute("data-src");
  function set(name, text, cls) {
    var el = box.querySelector('[data-counter="' + name + '"]');
    if (!el) { return; }
    el.textContent = text;
    if (cls !== undefined) { el.className = cls; }
  }
  function tick() {
    fetch(src, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (!r.ok) { throw new Error(r.status === 401 ? "signed out" : "HTTP " + r.status); }
        return r.json();
      })
      .then(function (c) {
        set("active_sessions", String(c.active_sessions));
        set("redis", c.redis.ready ? "ready" : "not ready: " + c.redis.detail,
          c.redis.ready ? "ok" : "bad");
        Object.keys(c.verify_per_second).forEach(function (k) {
          set("verify_" + k, c.verify_per_second[k].toFixed(1));
        });
        set("updated", "Live: updated " + c.at + ".");
        box.setAttribute("data-updated-ms", String(c.at_ms));
      })
      .catch(function (e) { set("updated", "Not updating (" + e.message + "); reload the page."); });
  }
  tick();
  window.setInterval(tick, 2000);
})();
