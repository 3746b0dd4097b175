// sniproxy status page: refreshes the server-rendered page in place from
// status.json. Only textContent and DOM nodes are written (never HTML), so
// nothing from the data can become markup.
"use strict";
(function () {
  var PROTOCOLS = ["tls", "http", "h2c", "unknown"];
  var REASONS = ["limit", "per_ip_limit", "proxy_header", "denied", "no_route", "sniff_timeout", "sniff_error", "dial_error"];
  var CHARTS = { connections: rate, active: count, rejected: rate, bytes: bytes };
  var W = 300, H = 60;
  var refresh = (parseInt(document.body.dataset.refresh, 10) || 2) * 1000;

  function $(id) { return document.getElementById(id); }
  function set(id, text) { var e = $(id); if (e) e.textContent = text; }

  function count(n) {
    n = Math.max(0, Math.floor(n || 0));
    return n.toString().replace(/\B(?=(\d{3})+(?!\d))/g, ",");
  }
  function rate(r) {
    if (!(r > 0)) return "0";
    if (r < 10) return r.toFixed(2);
    if (r < 1000) return r.toFixed(1);
    return count(r);
  }
  function bytes(n) {
    n = Math.max(0, n || 0);
    if (n < 1024) return Math.floor(n) + " B";
    var units = "KMGTPE", i = -1;
    do { n /= 1024; i++; } while (n >= 1024 && i < 5);
    return n.toFixed(1) + " " + units[i] + "iB";
  }
  function dur(sec) {
    sec = Math.max(0, sec || 0);
    if (sec < 1) return Math.round(sec * 1000) + "ms";
    if (sec < 60) return (Math.round(sec * 10) / 10) + "s";
    var d = Math.floor(sec / 86400), h = Math.floor(sec % 86400 / 3600),
        m = Math.floor(sec % 3600 / 60), s = Math.floor(sec % 60);
    if (d > 0) return d + "d" + h + "h" + m + "m0s";
    return (h > 0 ? h + "h" : "") + ((h > 0 || m > 0) ? m + "m" : "") + s + "s";
  }
  function since(t) {
    if (!t || t.indexOf("0001-") === 0) return "-";
    return dur((Date.now() - Date.parse(t)) / 1000);
  }
  function when(t) {
    return new Date(t).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }
  function sum(m) { var n = 0; for (var k in m) n += m[k]; return n; }

  function row(cells) {
    var tr = document.createElement("tr");
    cells.forEach(function (c) {
      var td = document.createElement("td");
      td.textContent = c.text;
      if (c.cls) td.className = c.cls;
      tr.appendChild(td);
    });
    return tr;
  }
  function fill(tableId, rows, emptyText, span) {
    var tb = $(tableId).tBodies[0];
    while (tb.firstChild) tb.removeChild(tb.firstChild);
    if (rows.length === 0 && emptyText) {
      var tr = row([{ text: emptyText, cls: "dim" }]);
      tr.className = "empty";
      tr.firstChild.colSpan = span;
      tb.appendChild(tr);
      return;
    }
    rows.forEach(function (r) { tb.appendChild(row(r)); });
  }

  function series(kind, h) {
    var out = [];
    for (var i = 0; i < h.length; i++) {
      if (kind === "active") { out.push(Math.max(0, h[i].active)); continue; }
      if (i === 0) continue;
      var dt = (Date.parse(h[i].time) - Date.parse(h[i - 1].time)) / 1000;
      if (!(dt > 0)) continue;
      var a, b;
      if (kind === "connections") { a = h[i].connections; b = h[i - 1].connections; }
      else if (kind === "rejected") { a = sum(h[i].rejected); b = sum(h[i - 1].rejected); }
      else { a = h[i].bytes_in + h[i].bytes_out; b = h[i - 1].bytes_in + h[i - 1].bytes_out; }
      out.push(Math.max(0, a - b) / dt);
    }
    return out;
  }
  function spark(v) {
    if (v.length < 2) return "";
    var top = Math.max.apply(null, v);
    if (!(top > 0)) top = 1;
    var d = "";
    for (var i = 0; i < v.length; i++) {
      var x = i * W / (v.length - 1), y = H - 2 - Math.max(0, v[i]) / top * (H - 4);
      d += (i === 0 ? "M" : " L") + x.toFixed(1) + " " + y.toFixed(1);
    }
    return d;
  }

  function render(s) {
    set("version", s.version);
    set("generation", s.generation);
    set("pid", s.pid);
    set("uptime", dur(s.uptime_seconds));
    var st = $("state");
    st.textContent = s.stopping ? "stopping" : "serving";
    st.className = s.stopping ? "bad" : "good";
    set("config", s.config);
    var t = s.totals, r = s.rates;
    set("active", count(t.active));
    set("connections", count(t.connections));
    set("conn-rate", rate(r.connections));
    set("rejected", count(sum(t.rejected)));
    set("rej-rate", rate(sum(r.rejected)));
    set("byte-rate", bytes(r.bytes_in + r.bytes_out));
    set("bytes-in", bytes(t.bytes_in));
    set("bytes-out", bytes(t.bytes_out));
    set("restarts", count(s.worker_restarts));
    set("window", dur(r.window_seconds));
    set("worker-count", (s.workers || []).length);
    Object.keys(CHARTS).forEach(function (k) {
      var v = series(k, s.history || []), f = CHARTS[k];
      $("chart-" + k).setAttribute("d", spark(v));
      set("chart-" + k + "-last", f(v.length ? v[v.length - 1] : 0));
      set("chart-" + k + "-peak", f(v.length ? Math.max.apply(null, v) : 0));
    });
    fill("workers", (s.workers || []).map(function (w) {
      return [{ text: w.slot }, { text: w.pid || "-" },
        { text: w.ready ? "ready" : "starting", cls: w.ready ? "good" : "bad" },
        { text: count(w.active), cls: "n" }, { text: count(w.restarts), cls: "n" },
        { text: since(w.started) }];
    }));
    fill("protocols", PROTOCOLS.map(function (p) {
      return [{ text: p }, { text: count((t.protocols || {})[p]), cls: "n" }, { text: rate((r.protocols || {})[p]), cls: "n" }];
    }));
    fill("reasons", REASONS.map(function (k) {
      return [{ text: k }, { text: count((t.rejected || {})[k]), cls: "n" }, { text: rate((r.rejected || {})[k]), cls: "n" }];
    }));
    fill("backends", (s.backends || []).map(function (b) {
      return [{ text: b.route }, { text: b.address + (b.backup ? " (backup)" : "") },
        { text: b.up ? "up" : "down", cls: b.up ? "good" : "bad" }, { text: since(b.since) },
        { text: count(b.active), cls: "n" }, { text: count(b.connections), cls: "n" }, { text: b.last_error || "" }];
    }), "No route has a backend pool.", 7);
    fill("reloads", (s.reloads || []).map(function (x) {
      return [{ text: when(x.time) }, { text: x.result, cls: x.result === "ok" ? "good" : "bad" },
        { text: dur(x.duration_seconds), cls: "n" }, { text: x.generation || "-" }, { text: x.error || "" }];
    }), "No reload since this master's predecessors started.", 5);
    document.title = "sniproxy · generation " + s.generation;
  }

  var failures = 0;
  function tick() {
    fetch("status.json", { cache: "no-store" }).then(function (res) {
      if (!res.ok) throw new Error(res.status + " " + res.statusText);
      return res.json();
    }).then(function (s) {
      render(s);
      failures = 0;
      var live = $("live");
      live.textContent = "· live, every " + refresh / 1000 + "s";
      live.className = "dim";
      document.body.dataset.live = "1";
      document.body.dataset.updated = String(Date.now());
    }).catch(function (e) {
      failures++;
      var live = $("live");
      live.textContent = "· not updating: " + e.message;
      live.className = "bad";
    }).then(function () {
      setTimeout(tick, Math.min(refresh * (1 + failures), 30000));
    });
  }
  tick();
})();
