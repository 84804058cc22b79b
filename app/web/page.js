// The page's live updates: each "state" event from /events carries the lanes section rendered
// by the server, which replaces the one on the page. Without JavaScript the page shows the
// state as of its load.
(function () {
  'use strict';
  var main = document.getElementById('lanes');
  var live = document.getElementById('live');
  if (!main || !window.EventSource) {
    return;
  }
  var updates = 0;
  var source = new EventSource('events');
  function mark(text, on) {
    live.textContent = text;
    live.className = on ? 'live on' : 'live off';
  }
  source.addEventListener('open', function () { mark('live', true); });
  source.addEventListener('error', function () {
    mark(source.readyState === EventSource.CLOSED ? 'updates stopped: reload to resume' : 'reconnecting…', false);
  });
  source.addEventListener('state', function (e) {
    var msg = JSON.parse(e.data);
    main.innerHTML = msg.html;
    updates++;
    document.body.setAttribute('data-updates', String(updates));
    mark('live', true);
  });
})();
