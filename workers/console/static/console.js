// Keyboard shortcuts for fast labelling. Plain JS, no build step; served from 'self' (the CSP forbids
// inline script). Nothing here renders post content: the server already did, escaped.
(function () {
  "use strict";
  var page = document.body.getAttribute("data-page");
  var $ = function (id) { return document.getElementById(id); };
  function typing(el) {
    return el && (el.tagName === "INPUT" || el.tagName === "SELECT" || el.tagName === "TEXTAREA");
  }
  function clickSafe() {
    // "safe" means no category and no risk description: clear what was preselected from the model
    var cat = $("category"), novel = $("novel");
    if (cat) { cat.value = ""; }
    if (novel) { novel.value = ""; }
  }
  var safe = $("btn-safe");
  if (safe) { safe.addEventListener("click", clickSafe); }

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) { return; }
    var t = e.target;
    if (page === "post" && typing(t)) {
      if (e.key === "Escape") { t.blur(); e.preventDefault(); }
      else if (e.key === "Enter" && (t.id === "novel" || t.id === "note" || t.id === "category")) {
        e.preventDefault();
        $("btn-unsafe").click();
      }
      return;
    }
    if (typing(t)) { return; }
    if (page === "queue") {
      if (e.key === "Enter") { e.preventDefault(); window.location.href = $("start").getAttribute("href"); }
      else if (e.key === "/") { e.preventDefault(); var f = document.querySelector(".filters select"); if (f) { f.focus(); } }
      return;
    }
    if (page === "post") {
      var act = { s: "btn-safe", u: "btn-unsafe", x: "btn-skip" }[e.key];
      var focus = { c: "category", d: "novel", n: "note" }[e.key];
      if (act && $(act)) { e.preventDefault(); $(act).click(); }
      else if (focus && $(focus)) { e.preventDefault(); $(focus).focus(); }
      else if (e.key === "q") { e.preventDefault(); window.location.href = "/"; }
    }
  });
})();
