// The open room's message list: a node per message kept in step with the room's timeline,
// ticks updated in place, the scroll position kept, and which messages are on screen.

import { el, reconcile } from './dom.js';

const TICKS = { pending: '◷', failed: '⚠', sent: '✓', delivered: '✓✓', read: '✓✓' };

export class MessageList {
  #nodes = new Map();   // message key -> <li>
  #visible = new Set(); // seqs of the messages on screen
  #observer;

  // nameOf(user_id) -> display name; onSeen(): what is on screen changed;
  // onRetry(room, client_msg_id): the user asked to send a failed message again.
  constructor({ list, scroller, older, nameOf, onSeen, onRetry }) {
    Object.assign(this, { list, scroller, older, nameOf, onRetry });
    this.#observer = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        const seq = Number(entry.target.dataset.seq);
        if (entry.isIntersecting) this.#visible.add(seq);
        else this.#visible.delete(seq);
      }
      onSeen();
    }, { root: scroller, rootMargin: '-16px 0px' });
  }

  // The newest seq on screen, 0 if none.
  get newestVisible() {
    return this.#visible.size ? Math.max(...this.#visible) : 0;
  }

  clear() {
    this.#observer.disconnect();
    this.#visible.clear();
    this.#nodes.clear();
    this.list.replaceChildren();
  }

  // Stays at the bottom if it was there (or `follow`), keeps the view when paging up.
  render(room, me, { follow = false, prepended = false } = {}) {
    const scroller = this.scroller;
    const fromBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight;
    const items = room.timeline(me);
    const keys = new Set(items.map((item) => item.key));
    for (const [key, node] of this.#nodes) {
      if (keys.has(key)) continue;
      this.#observer.unobserve(node);
      this.#visible.delete(Number(node.dataset.seq));
      this.#nodes.delete(key);
    }
    reconcile(this.list, items.map((item) => this.#node(room, me, item)));
    this.older.hidden = !room.hasMore;
    if (follow || fromBottom < 48) scroller.scrollTop = scroller.scrollHeight;
    else if (prepended) scroller.scrollTop = scroller.scrollHeight - scroller.clientHeight - fromBottom;
  }

  #node(room, me, item) {
    let node = this.#nodes.get(item.key);
    if (!node) {
      const group = room.meta.kind === 'group';
      node = el('li', { class: item.mine ? 'msg mine' : 'msg', 'data-testid': 'message' },
        group && !item.mine ? el('div', { class: 'sender', 'data-testid': 'message-sender' }) : null,
        el('div', { class: 'body', 'data-testid': 'message-body', text: item.body }),
        el('div', { class: 'meta' },
          el('time', { 'data-testid': 'message-time' }),
          item.mine ? el('button', {
            type: 'button', class: 'tick', 'data-testid': 'message-status',
            onclick: () => this.#clickTick(room, item.client_msg_id, node),
          }) : null),
        item.mine ? el('p', { class: 'receipts', 'data-testid': 'receipt-detail', hidden: true })
          : null);
      this.#nodes.set(item.key, node);
    }
    if (item.seq && node.dataset.seq !== String(item.seq)) {
      node.dataset.seq = item.seq;
      this.#observer.observe(node);
    }
    const sender = node.querySelector('.sender');
    if (sender) sender.textContent = this.nameOf(item.sender_id);
    const time = node.querySelector('time');
    time.dateTime = new Date(item.ts).toISOString();
    time.textContent = formatTime(item.ts);
    if (item.mine) this.#tick(room, me, item, node);
    return node;
  }

  #tick(room, me, item, node) {
    const error = room.pending.get(item.client_msg_id)?.error;
    let status;
    let text;
    if (error) {
      status = 'failed';
      text = `Not sent: ${error} Click to try again.`;
    } else if (!item.seq) {
      status = 'pending';
      text = 'Sending…';
    } else {
      const receipts = room.status(item.seq, me);
      status = receipts.status;
      text = this.#describe(room, receipts);
    }
    const tick = node.querySelector('.tick');
    tick.dataset.status = status;
    tick.textContent = TICKS[status];
    tick.title = text;
    tick.setAttribute('aria-label', text);
    node.querySelector('.receipts').textContent = text;
  }

  #describe(room, { status, readBy, deliveredTo, waiting }) {
    if (room.meta.kind === 'direct') {
      return { sent: 'Sent', delivered: 'Delivered', read: 'Read' }[status];
    }
    const list = (ids) => ids.map(this.nameOf).join(', ');
    return [
      readBy.length ? `Read by ${list(readBy)}` : '',
      deliveredTo.length ? `Delivered to ${list(deliveredTo)}` : '',
      waiting.length ? `Not yet delivered to ${list(waiting)}` : '',
    ].filter(Boolean).join(' · ') || 'Sent';
  }

  // A failed message is sent again (same client_msg_id); otherwise show who has it.
  #clickTick(room, clientMsgId, node) {
    if (room.pending.get(clientMsgId)?.error) {
      this.onRetry(room, clientMsgId);
    } else {
      const detail = node.querySelector('.receipts');
      detail.hidden = !detail.hidden;
    }
  }
}

function formatTime(ts) {
  const date = new Date(ts);
  const today = date.toDateString() === new Date().toDateString();
  return today
    ? date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })
    : date.toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' });
}
