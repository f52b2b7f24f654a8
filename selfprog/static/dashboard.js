// selfprog serve: keeps a run's page live. It asks summary.json every few seconds and, when
// the run changed, swaps in the live part the server rendered (escaped there) again.
"use strict";

(function () {
  const live = document.getElementById("live");
  if (!live) {
    return; // the index and candidate pages are not live
  }
  const every = Math.max(1, Number(live.dataset.poll) || 3) * 1000;
  const status = document.getElementById("poll-status");
  let revision = live.dataset.revision;

  async function fetchOk(url) {
    const reply = await fetch(url, { cache: "no-store", credentials: "same-origin" });
    if (!reply.ok) {
      throw new Error(`${url}: ${reply.status} ${reply.statusText}`);
    }
    return reply;
  }

  async function poll() {
    try {
      const numbers = await (await fetchOk("summary.json")).json();
      if (numbers.revision !== revision) {
        const part = await (await fetchOk("live")).text();
        live.innerHTML = part; // rendered by the server's autoescaping templates
        revision = numbers.revision;
        live.dataset.revision = revision;
      }
      status.textContent = `live: checked at ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      status.textContent = `cannot reach the dashboard (${err.message}); trying again`;
    } finally {
      window.setTimeout(poll, every);
    }
  }

  // a circle of the lineage tree opens its candidate
  live.addEventListener("click", (event) => {
    const node = event.target instanceof Element ? event.target.closest("g.node") : null;
    const label = node ? node.querySelector("text") : null;
    if (label && /^\d+$/.test(label.textContent)) {
      window.location.href = `candidate/${label.textContent}`;
    }
  });

  window.setTimeout(poll, every);
})();
