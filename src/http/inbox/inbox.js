// The inbox page's only script. Once a second it fetches the conversations again, as the
// server renders them (escaped there), and swaps them in when they changed: a new text
// shows without a reload. "Empty" empties what the filters select.
(function () {
  'use strict';
  var list = document.getElementById('conversations');
  var last = null;

  function showCount() {
    var summary = list.querySelector('[data-count]');
    if (summary) {
      document.title = 'smsgw inbox (' + summary.getAttribute('data-count') + ')';
    }
  }

  function refresh() {
    return fetch('/inbox/conversations' + location.search, { cache: 'no-store' })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html !== null && html !== last) {
          last = html;
          list.innerHTML = html;
          showCount();
        }
      })
      .catch(function () { /* the daemon is restarting: try again next time */ });
  }

  function poll() {
    var next = function () { setTimeout(poll, 1000); };
    if (document.hidden) { next(); return; }
    refresh().then(next, next);
  }

  document.getElementById('empty').addEventListener('click', function () {
    fetch('/inbox/api/messages' + location.search, { method: 'DELETE' }).then(refresh);
  });
  showCount();
  poll();
})();
