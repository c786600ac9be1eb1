// The inbox page's only script. Once a second it fetches the conversations again, as the
// server renders them (escaped there), and swaps them in when they changed: a new text
// shows without a reload; not while a reply is being typed, so nothing typed is lost.
// "Empty" empties what the filters select; a reply box posts a reply as the phone would.
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

  function typing() {
    var boxes = list.querySelectorAll('.reply-box input');
    for (var i = 0; i < boxes.length; i++) {
      if (boxes[i].value !== '' || boxes[i] === document.activeElement) { return true; }
    }
    return false;
  }

  // `force`: swap in even while a box holds text (right after a reply was sent).
  function refresh(force) {
    return fetch('/inbox/conversations' + location.search, { cache: 'no-store' })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html !== null && html !== last && (force === true || !typing())) {
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
    refresh(false).then(next, next);
  }

  list.addEventListener('submit', function (event) {
    var form = event.target;
    if (!form.classList.contains('reply-box')) { return; }
    event.preventDefault();
    var input = form.querySelector('input');
    var reply = {
      from: form.getAttribute('data-from'),
      to: form.getAttribute('data-to'),
      body: input.value
    };
    fetch('/inbox/api/replies', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(reply)
    }).then(function (response) {
      if (response.ok) { input.value = ''; input.blur(); }
      return refresh(response.ok);
    }, function () { /* the daemon is restarting: the text stays in the box */ });
  });

  document.getElementById('empty').addEventListener('click', function () {
    fetch('/inbox/api/messages' + location.search, { method: 'DELETE' }).then(refresh);
  });
  showCount();
  poll();
})();
