// palr's page: plain DOM and fetch, no build step. Reads ?user=ID; every text goes in with textContent.
"use strict";
const $ = (id) => document.getElementById(id);
const picked = [];  // [{item, title, tags}] built from search results
let maxK = 50;

function token() { return sessionStorage.getItem("palr-token") || ""; }

async function api(path, body) {
  const headers = { "accept": "application/json" };
  if (token()) headers["authorization"] = "Bearer " + token();
  const opts = body === undefined ? { headers } :
    { method: "POST", headers: { ...headers, "content-type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const d = data.detail;
    const msg = Array.isArray(d) ? d.map((e) => (e.loc || []).slice(1).join(".") + ": " + e.msg).join("; ") : d;
    throw new Error(`${r.status}: ${msg || r.statusText}`);
  }
  return data;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function showMessage(text) {
  $("message").textContent = text || "";
  $("message").hidden = !text;
}

function itemLine(it) {
  const li = el("li");
  const left = el("span");
  left.append(el("span", it.title + " "), el("span", (it.tags || []).join(", "), "tags"));
  li.append(left);
  return li;
}

function renderProfile(title, profile, seen) {
  $("intro").hidden = true;
  $("profile-card").hidden = false;
  $("profile-title").textContent = title;
  $("profile").textContent = profile || "(no profile)";
  $("seen-summary").textContent = `History: ${seen.length} item${seen.length === 1 ? "" : "s"} (latest first)`;
  $("seen").replaceChildren(...seen.slice().reverse().slice(0, 200).map(itemLine));
}

function renderRecs(rec) {
  $("recs-card").hidden = false;
  $("notes").replaceChildren(...(rec.notes || []).map((n) => el("li", n)));
  const by = rec.llm && rec.llm.ranked_by;
  const name = rec.llm && rec.llm.name ? String(rec.llm.name).split("/").filter(Boolean).pop() : "";
  $("ranked-by").textContent = by ? `ranked by: ${by}${name && name !== by ? " (" + name + ")" : ""}` : "";
  const rows = rec.items.map((it, i) => {
    const tr = el("tr");
    const title = el("td", null, "title");
    title.append(el("div", it.title));
    if (it.explanation) title.append(el("div", it.explanation, "why"));
    const score = it.score === null || it.score === undefined ? "–" : it.score.toFixed(3);
    const rank = it.retriever_rank === null || it.retriever_rank === undefined ? "–" : String(it.retriever_rank);
    tr.append(el("td", String(i + 1)), title, el("td", score, "num"), el("td", rank, "num"));
    return tr;
  });
  $("recs").tBodies[0].replaceChildren(...rows);
}

function options() {
  const k = Math.max(1, Math.min(maxK, parseInt($("k").value, 10) || 10));
  $("k").value = k;
  return { k, explain: $("explain").checked };
}

async function showUser(user) {
  showMessage("");
  const url = new URL(location.href);
  url.searchParams.set("user", user);
  window.history.replaceState(null, "", url);
  try {
    const [u, rec] = await Promise.all([api("/users/" + encodeURIComponent(user)),
                                        api("/recommend", { user, ...options() })]);
    renderProfile(`User ${u.user}`, u.profile, u.history);
    renderRecs(rec);
  } catch (e) { showMessage(e.message); }
}

async function recommendHistory() {
  showMessage("");
  const url = new URL(location.href);
  url.searchParams.delete("user");
  window.history.replaceState(null, "", url);
  try {
    const rec = await api("/recommend", { history: picked.map((h) => h.item), ...options() });
    renderProfile("Your history", rec.profile, picked);
    renderRecs(rec);
  } catch (e) { showMessage(e.message); }
}

function renderHistory() {
  $("history").replaceChildren(...picked.map((h, i) => {
    const li = itemLine(h);
    const b = el("button", "×", "secondary");
    b.title = "remove";
    b.onclick = () => { picked.splice(i, 1); renderHistory(); };
    li.append(b);
    return li;
  }));
  $("history-count").textContent = picked.length ? `(${picked.length})` : "(empty)";
  $("recommend-history").disabled = $("clear-history").disabled = !picked.length;
}

let searchTimer = null;
async function search() {
  const q = $("search").value.trim();
  if (!q) { $("search-results").replaceChildren(); return; }
  try {
    const res = await api("/items?limit=8&q=" + encodeURIComponent(q));
    const rows = res.items.map((it) => {
      const li = itemLine(it);
      const b = el("button", "add");
      b.disabled = picked.some((h) => h.item === it.item);
      b.onclick = () => { picked.push(it); b.disabled = true; renderHistory(); };
      li.append(b);
      return li;
    });
    if (!rows.length) rows.push(el("li", "no title matches", "muted"));
    $("search-results").replaceChildren(...rows);
  } catch (e) { showMessage(e.message); }
}

async function loadUsers() {  // the picker's suggestions
  try {
    const users = await api("/users?limit=200");
    $("user-ids").replaceChildren(...users.users.map((u) => { const o = el("option"); o.value = u; return o; }));
    showMessage("");
  } catch (e) { showMessage(e.message); }
}

async function init() {
  $("token").value = token();
  $("token").onchange = () => { sessionStorage.setItem("palr-token", $("token").value.trim()); loadUsers(); };
  $("user-form").onsubmit = (ev) => { ev.preventDefault(); showUser($("user").value.trim()); };
  $("search").oninput = () => { clearTimeout(searchTimer); searchTimer = setTimeout(search, 200); };
  $("recommend-history").onclick = recommendHistory;
  $("clear-history").onclick = () => { picked.length = 0; renderHistory(); search(); };
  try {
    const h = await api("/health");
    maxK = h.max_k;
    $("k").max = maxK;
    $("run-info").textContent = `${h.dataset}: ${h.users.toLocaleString()} users, ` +
      `${h.items.toLocaleString()} items; candidates per user: ${h.max_k}`;
    $("token-box").hidden = !h.auth;
    if (!h.auth || token()) await loadUsers();
  } catch (e) { showMessage(e.message); }
  const user = new URL(location.href).searchParams.get("user");
  if (user) { $("user").value = user; await showUser(user); }
}

document.addEventListener("DOMContentLoaded", init);
