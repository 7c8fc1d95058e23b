// igdpcp LAN page: a little JavaScript, none required (every form works without it).
// 1. Remaining lifetimes count down between page loads.
// 2. A delete asks first.
"use strict";
(function () {
  function fmt(s) {
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
    return Math.floor(s / 86400) + "d" + String(Math.floor(s % 86400 / 3600)).padStart(2, "0") + "h";
  }
  var cells = document.querySelectorAll("[data-remaining]");
  var start = Date.now();
  function tick() {
    var gone = Math.floor((Date.now() - start) / 1000);
    cells.forEach(function (td) {
      var left = Math.max(0, parseInt(td.getAttribute("data-remaining"), 10) - gone);
      td.textContent = fmt(left);
    });
  }
  if (cells.length) setInterval(tick, 1000);
  document.querySelectorAll("form.delete").forEach(function (f) {
    f.addEventListener("submit", function (ev) {
      if (!window.confirm("Delete the forward of " + f.getAttribute("data-what") + "?")) ev.preventDefault();
    });
  });
})();
