// apd-lens browse: a static page over data/*.js (globals, so that it works from file://).
// URL: #card=<site>:<c> opens a card; ?test=click-first clicks the first table row (browser tests).
(function () {
  "use strict";
  var INDEX = window.APD_INDEX;
  var GRAPH = window.APD_GRAPH;
  var CLUSTERS = window.APD_CLUSTERS;
  var PAGE_SIZE = 100;
  var COL = { site: 0, c: 1, density: 2, mean_ci: 3, n_firing: 4, tokens: 5, ablation: 6, cluster: 7, card: 8 };
  var state = { sortCol: COL.density, sortDesc: true, page: 0, query: "", aliveOnly: true, rows: [] };
  var cards = {};        // card number -> data, as the card files arrive
  var pending = {};      // card number -> callbacks waiting for it
  var byKey = {};        // "site:c" -> row

  function $(id) { return document.getElementById(id); }
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "onclick") node.addEventListener("click", attrs[k]);
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (ch) { if (ch != null) node.appendChild(ch); });
    return node;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined) return "";
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x) && Math.abs(x) < 1e6) return String(x);
    if (x === 0) return "0";
    return Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? x.toPrecision(digits || 4) : x.toExponential(2);
  }
  function showToken(t) { return String(t).replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192"); }
  function keyOf(site, c) { return site + ":" + c; }

  if (!INDEX) {
    document.body.insertBefore(el("p", { "class": "note", text: "data/index.js is missing: rebuild with apd-lens browse" }),
      document.body.firstChild);
    return;
  }
  INDEX.rows.forEach(function (r) { byKey[keyOf(r[COL.site], r[COL.c])] = r; });

  // ---------------------------------------------------------------- header and tabs
  $("title").textContent = "apd-lens browse" + (INDEX.title ? ": " + INDEX.title : "");
  var nAlive = INDEX.rows.filter(function (r) { return r[COL.n_firing] > 0; }).length;
  $("summary").textContent = INDEX.rows.length + " subcomponents in " + INDEX.sites.length + " sites; " + nAlive +
    " fire (CI > " + INDEX.threshold + ") on " +
    (INDEX.kind === "tokens" ? INDEX.n_points + " tokens of " + INDEX.n_sequences + " sequences" : INDEX.n_points + " data points") +
    ". Ablation: " +
    (INDEX.ablation_metric === "kl" ? "KL(target || model without it)" : "MSE to the target without it") +
    " on the positions where it fires.";
  Array.prototype.forEach.call(document.querySelectorAll(".tab"), function (tab) {
    tab.addEventListener("click", function () { showView(tab.getAttribute("data-view")); });
  });
  function showView(name) {
    Array.prototype.forEach.call(document.querySelectorAll(".tab"), function (t) {
      t.classList.toggle("active", t.getAttribute("data-view") === name);
    });
    ["table", "graph", "clusters"].forEach(function (v) { $("view-" + v).classList.toggle("hidden", v !== name); });
  }

  // ---------------------------------------------------------------- table
  function filterAndSort() {
    var q = state.query.trim().toLowerCase();
    var rows = INDEX.rows.filter(function (r) {
      if (state.aliveOnly && r[COL.n_firing] === 0) return false;
      if (!q) return true;
      return keyOf(r[COL.site], r[COL.c]).toLowerCase().indexOf(q) >= 0 ||
        String(r[COL.tokens]).toLowerCase().indexOf(q) >= 0 ||
        (r[COL.cluster] !== null && ("cluster " + r[COL.cluster]) === q);
    });
    var col = state.sortCol, sign = state.sortDesc ? -1 : 1;
    rows.sort(function (a, b) {
      var x = a[col], y = b[col];
      if (x === y) return a[COL.card] - b[COL.card];
      if (x === null) return 1;
      if (y === null) return -1;
      return (x < y ? -1 : 1) * sign;
    });
    state.rows = rows;
  }
  function renderTable() {
    var body = $("rows");
    body.textContent = "";
    var nPages = Math.max(1, Math.ceil(state.rows.length / PAGE_SIZE));
    state.page = Math.min(state.page, nPages - 1);
    var start = state.page * PAGE_SIZE;
    var frag = document.createDocumentFragment();
    state.rows.slice(start, start + PAGE_SIZE).forEach(function (r) {
      var key = keyOf(r[COL.site], r[COL.c]);
      var tr = el("tr", { "data-key": key, "data-card": r[COL.card] }, [
        el("td", { text: r[COL.site] }), el("td", { "class": "num", text: r[COL.c] }),
        el("td", { "class": "num", text: fmt(r[COL.density]) }), el("td", { "class": "num", text: fmt(r[COL.mean_ci]) }),
        el("td", { "class": "num", text: r[COL.n_firing] }), el("td", { "class": "tok", text: showToken(r[COL.tokens]) }),
        el("td", { "class": "num", text: fmt(r[COL.ablation]) }),
        el("td", { "class": "num", text: r[COL.cluster] === null ? "" : r[COL.cluster] })
      ]);
      tr.addEventListener("click", function () { selectCard(key); });
      frag.appendChild(tr);
    });
    body.appendChild(frag);
    $("count").textContent = state.rows.length + " shown";
    $("page").textContent = " page " + (state.page + 1) + " / " + nPages + " ";
    Array.prototype.forEach.call(document.querySelectorAll("#table th"), function (th) {
      var col = Number(th.getAttribute("data-col"));
      th.classList.toggle("sorted-desc", col === state.sortCol && state.sortDesc);
      th.classList.toggle("sorted-asc", col === state.sortCol && !state.sortDesc);
    });
  }
  function refresh() { filterAndSort(); renderTable(); }
  Array.prototype.forEach.call(document.querySelectorAll("#table th"), function (th) {
    th.addEventListener("click", function () {
      var col = Number(th.getAttribute("data-col"));
      if (state.sortCol === col) state.sortDesc = !state.sortDesc;
      else { state.sortCol = col; state.sortDesc = col >= COL.density && col !== COL.tokens; }
      refresh();
    });
  });
  $("search").addEventListener("input", function (e) { state.query = e.target.value; state.page = 0; refresh(); });
  $("alive-only").addEventListener("change", function (e) { state.aliveOnly = e.target.checked; state.page = 0; refresh(); });
  $("prev").addEventListener("click", function () { state.page = Math.max(0, state.page - 1); renderTable(); });
  $("next").addEventListener("click", function () { state.page += 1; renderTable(); });

  // ---------------------------------------------------------------- cards (loaded lazily)
  window.APD_CARD = function (n, data) {
    cards[n] = data;
    (pending[n] || []).forEach(function (f) { f(data); });
    delete pending[n];
  };
  function loadCard(n, then) {
    if (cards[n]) { then(cards[n]); return; }
    if (pending[n]) { pending[n].push(then); return; }
    pending[n] = [then];
    var s = document.createElement("script");
    s.src = "data/cards/" + n + ".js";
    s.onerror = function () { $("card").textContent = "card file data/cards/" + n + ".js could not be loaded"; };
    document.head.appendChild(s);
  }
  function selectCard(key) {
    if (history.replaceState) history.replaceState(null, "", "#card=" + encodeURIComponent(key));
    openCard(key);
  }
  function openCard(key) {
    var row = byKey[key];
    if (!row) { $("card").textContent = "no subcomponent " + key + " in this harvest"; return; }
    Array.prototype.forEach.call(document.querySelectorAll("#rows tr"), function (tr) {
      tr.classList.toggle("selected", tr.getAttribute("data-key") === key);
    });
    loadCard(row[COL.card], renderCard);
  }
  function stat(name, key, value, digits) {
    return el("div", {}, [el("b", { text: name + ": " }),
      el("span", { "class": "stat", "data-key": key, "data-value": JSON.stringify(value), text: fmt(value, digits) })]);
  }
  function pairsTable(title, pairs, cls) {
    if (!pairs || !pairs.length) return null;
    return el("table", { "class": "pairs", "data-key": title }, [el("tr", {}, [el("th", { colspan: "2", text: title })])]
      .concat(pairs.map(function (p) {
        return el("tr", {}, [el("td", { "class": "tok", text: showToken(p[0]) }),
          el("td", { "class": "num " + (cls || ""), "data-value": JSON.stringify(p[1]), text: fmt(p[1], 3) })]);
      })));
  }
  function contextLine(ctx) {
    var spans = ctx.t.map(function (tok, i) {
      var g = ctx.ci[i] === null ? 0 : ctx.ci[i];
      var text = showToken(tok) + (ctx.v ? "=" + fmt(ctx.v[i], 2) : "");
      return el("span", { "class": i === ctx.f ? "focus" : "", title: "CI " + fmt(g),
        style: "background: rgba(255, 120, 0, " + Math.max(0, Math.min(1, g)).toFixed(3) + ")", text: text });
    });
    if (!spans.length) spans = [el("span", { "class": "note", text: "(no active feature)" })];
    return el("div", { "class": ctx.v ? "context features" : "context", "data-score": JSON.stringify(ctx.s) },
      [el("span", { "class": "num", text: fmt(ctx.s, 3) + "  " })].concat(spans));
  }
  function renderCard(d) {
    var box = $("card");
    box.textContent = "";
    var metric = d.ablation_metric === "kl" ? "ablation KL" : "ablation MSE";
    var body = el("div", { id: "card-body", "data-site": d.site, "data-index": String(d.index) }, [
      el("h2", { text: d.site + " #" + d.index }),
      stat("density", "density", d.density), stat("mean CI", "mean_ci", d.mean_ci),
      stat("fires", "n_firing", d.n_firing),
      d.ablation === null ? el("div", { "class": "note", text: metric + ": not computed (only the densest are)" })
        : stat(metric, "ablation", d.ablation),
      el("div", {}, [pairsTable(INDEX.kind === "tokens" ? "current token" : "active feature", d.current),
        pairsTable("next token", d.next),
        pairsTable("promotes", d.promoted, "pos"), pairsTable("suppresses", d.suppressed, "neg")]),
      el("h3", { text: "Top activating contexts" }),
      el("div", { id: "top-contexts" }, d.top.map(contextLine)),
      el("h3", { text: "Random firing contexts" }),
      el("div", { id: "sample-contexts" }, d.sample.map(contextLine))
    ]);
    if (!d.n_firing) body.appendChild(el("p", { "class": "note", text: "It never fires on the harvested data." }));
    box.appendChild(body);
    document.body.setAttribute("data-card-ready", keyOf(d.site, d.index));
  }
  function openFromHash() {
    var m = /card=([^&]+)/.exec(location.hash);
    if (m) openCard(decodeURIComponent(m[1]));
  }
  window.addEventListener("hashchange", openFromHash);

  // ---------------------------------------------------------------- attribution graph (SVG)
  var SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, children) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    (children || []).forEach(function (ch) { node.appendChild(ch); });
    return node;
  }
  function renderGraph() {
    var box = $("graph");
    if (!GRAPH) {
      box.appendChild(el("p", { "class": "note", text: "No attribution graph: " + (INDEX.notes.graph || "none saved") +
        ". Run apd-lens browse RUN --prompt TEXT to compute one." }));
      return;
    }
    var siteOrder = INDEX.sites.slice();
    GRAPH.nodes.forEach(function (n) { if (siteOrder.indexOf(n.site) < 0) siteOrder.push(n.site); });
    var used = siteOrder.filter(function (s) { return GRAPH.nodes.some(function (n) { return n.site === s; }); });
    var tokens = GRAPH.prompt_tokens || [];
    var nPos = Math.max(tokens.length, 1 + Math.max.apply(null, GRAPH.nodes.map(function (n) { return n.position; }).concat([0])));
    var colW = 70, rowH = 44, left = 170, top = 20, bottom = 40;
    var width = left + nPos * colW + 20, height = top + used.length * rowH + bottom;
    var place = {}, groups = {};
    GRAPH.nodes.forEach(function (n) { var g = n.position + "|" + n.site; (groups[g] = groups[g] || []).push(n); });
    Object.keys(groups).forEach(function (g) {
      var list = groups[g];
      list.forEach(function (n, k) {
        var spread = Math.min(10, (colW - 14) / Math.max(1, list.length));
        var row = used.indexOf(n.site);
        place[n.id] = { x: left + n.position * colW + colW / 2 + (k - (list.length - 1) / 2) * spread,
                        y: top + (used.length - 1 - row) * rowH + rowH / 2 };
      });
    });
    var root = svg("svg", { width: width, height: height, id: "graph-svg" });
    used.forEach(function (s, row) {
      var y = top + (used.length - 1 - row) * rowH + rowH / 2;
      root.appendChild(svg("line", { x1: left, x2: width - 10, y1: y, y2: y, stroke: "#eee" }));
      var label = svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", "font-size": "11" });
      label.textContent = s;
      root.appendChild(label);
    });
    tokens.forEach(function (t, p) {
      var label = svg("text", { x: left + p * colW + colW / 2, y: height - 14, "text-anchor": "middle",
        "font-size": "11", "font-family": "monospace" });
      label.textContent = showToken(t);
      root.appendChild(label);
    });
    var maxW = Math.max.apply(null, GRAPH.edges.map(function (e) { return Math.abs(e.weight); }).concat([1e-30]));
    GRAPH.edges.forEach(function (e) {
      var a = place[e.source], b = place[e.target];
      if (!a || !b) return;
      var line = svg("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, "class": "edge",
        stroke: e.weight >= 0 ? "#1a5fb4" : "#c01c28", "stroke-opacity": "0.55",
        "stroke-width": (0.3 + 5 * Math.abs(e.weight) / maxW).toFixed(2) });
      line.appendChild(svg("title", {}));
      line.firstChild.textContent = e.source + " \u2192 " + e.target + ": " + fmt(e.weight);
      root.appendChild(line);
    });
    GRAPH.nodes.forEach(function (n) {
      var p = place[n.id];
      var ci = typeof n.ci === "number" ? n.ci : 1;
      var circle = svg("circle", { cx: p.x, cy: p.y, r: 5, "class": "node", "data-id": n.id,
        fill: n.kind === "output" ? "#333" : "rgba(255, 120, 0, " + (0.25 + 0.75 * ci).toFixed(3) + ")", stroke: "#333" });
      var title = svg("title", {});
      title.textContent = n.site + " #" + n.subcomponent + " at " + n.position + (typeof n.ci === "number" ? ", CI " + fmt(n.ci) : "");
      circle.appendChild(title);
      if (byKey[keyOf(n.site, n.subcomponent)]) {
        circle.addEventListener("click", function () { selectCard(keyOf(n.site, n.subcomponent)); });
      }
      root.appendChild(circle);
    });
    box.appendChild(el("p", {}, [document.createTextNode(GRAPH.nodes.length + " nodes, " + GRAPH.edges.length +
      " edges (width: |weight|; blue positive, red negative). Click a node for its card.")]));
    box.appendChild(root);
  }

  // ---------------------------------------------------------------- clusters
  function renderClusters() {
    var box = $("clusters");
    if (!CLUSTERS) {
      box.appendChild(el("p", { "class": "note", text: "No clustering: " + (INDEX.notes.clusters || "none saved") + "." }));
      return;
    }
    var facts = Object.keys(CLUSTERS).filter(function (k) {
      return k !== "clusters" && (typeof CLUSTERS[k] === "number" || typeof CLUSTERS[k] === "string");
    });
    box.appendChild(el("p", { text: CLUSTERS.clusters.length + " clusters" +
      (facts.length ? "; " + facts.map(function (k) { return k + " " + fmt(CLUSTERS[k]); }).join(", ") : "") }));
    CLUSTERS.clusters.forEach(function (cl, i) {
      var id = cl.id === undefined ? i : cl.id;
      var links = cl.members.map(function (m) {
        var key = keyOf(m.site, m.subcomponent);
        return el("a", { text: key, onclick: function () { selectCard(key); } });
      });
      box.appendChild(el("div", { "class": "cluster", "data-cluster": String(id) },
        [el("b", { text: "cluster " + id + " (" + cl.members.length + "): " })].concat(links)));
    });
  }

  // ---------------------------------------------------------------- start
  refresh();
  renderGraph();
  renderClusters();
  openFromHash();
  var view = /[?&]view=(\w+)/.exec(location.search);
  if (view) showView(view[1]);
  if (/[?&]test=click-first/.test(location.search)) {
    var first = document.querySelector("#rows tr");
    if (first) first.dispatchEvent(new MouseEvent("click", { bubbles: true }));
  }
})();
