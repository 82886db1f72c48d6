// The WebSocket session: hello with resume, heartbeat, reconnect with backoff, the send outbox.
//
// `state` is 'connecting' (never welcomed yet), 'online' (welcomed), 'reconnecting' (lost the
// session, trying again) or 'offline' (the browser has no network: wait for its `online` event).

const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 30_000;
const WELCOME_TIMEOUT_MS = 10_000;
const PING_EVERY_MS = 10_000;
const PONG_TIMEOUT_MS = 5_000;
const RETRY_SEND_AFTER = new Set(['rate_limited', 'unavailable']);
const CLOSE_UNAUTHORIZED = 4001;

export class Connection {
  state = 'connecting';
  #ws = null;
  #welcomed = false;
  #everOnline = false;
  #stopped = false;
  #attempt = 0;
  #retryTimer = 0;
  #pingTimer = 0;
  #deadline = 0;
  #unacked = new Map(); // client_msg_id -> send frame, oldest first

  // handlers: token(), resume() -> {room_id: last_seq}, onWelcome(frame), onFrame(frame),
  // onAck(frame), onSendFailed(frame, error), onState(state), onAuthLost().
  constructor(handlers) {
    this.h = handlers;
  }

  start() {
    addEventListener('online', this.#onOnline);
    addEventListener('offline', this.#onOffline);
    this.#connect();
  }

  stop() {
    this.#stopped = true;
    removeEventListener('online', this.#onOnline);
    removeEventListener('offline', this.#onOffline);
    clearTimeout(this.#retryTimer);
    this.#drop();
  }

  // Sends now if the session is up; false otherwise.
  send(frame) {
    if (!this.#welcomed) return false;
    this.#ws.send(JSON.stringify(frame));
    return true;
  }

  // Kept until acked and sent again after every reconnect with the same client_msg_id:
  // the server stores it once and acks a repeat with the original seq.
  sendMessage(roomId, clientMsgId, body) {
    const frame = {
      type: 'send', id: `send:${clientMsgId}`, room_id: roomId, client_msg_id: clientMsgId, body,
    };
    this.#unacked.set(clientMsgId, frame);
    this.send(frame);
  }

  #onOnline = () => {
    this.#attempt = 0;
    if (!this.#ws) {
      clearTimeout(this.#retryTimer);
      this.#connect();
    }
  };

  // A socket that was open may survive a lost network for minutes: drop it now, and wait.
  #onOffline = () => {
    clearTimeout(this.#retryTimer);
    this.#drop();
    this.#setState('offline');
  };

  #connect() {
    if (!navigator.onLine) {
      this.#setState('offline');
      return;
    }
    this.#setState(this.#everOnline ? 'reconnecting' : 'connecting');
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${scheme}//${location.host}/ws`);
    this.#ws = ws;
    this.#expectWithin(WELCOME_TIMEOUT_MS);
    ws.onopen = () => ws.send(JSON.stringify({
      type: 'hello', token: this.h.token(), resume: this.h.resume(),
    }));
    ws.onmessage = (event) => this.#onFrame(JSON.parse(event.data));
    ws.onclose = (event) => this.#onClose(event.code);
  }

  #onFrame(frame) {
    clearTimeout(this.#deadline);
    switch (frame.type) {
      case 'welcome':
        this.#welcomed = true;
        this.#everOnline = true;
        this.#attempt = 0;
        this.#pingTimer = setInterval(() => this.#ping(), PING_EVERY_MS);
        this.#setState('online');
        this.h.onWelcome(frame);
        for (const send of this.#unacked.values()) this.send(send);
        break;
      case 'pong':
        break;
      case 'ack':
        this.#unacked.delete(frame.client_msg_id);
        this.h.onAck(frame);
        break;
      case 'error':
        if (frame.id?.startsWith('send:')) this.#sendFailed(frame);
        else this.h.onFrame(frame);
        break;
      default:
        this.h.onFrame(frame);
    }
  }

  #sendFailed(error) {
    const clientMsgId = error.id.slice('send:'.length);
    const frame = this.#unacked.get(clientMsgId);
    if (!frame) return;
    if (RETRY_SEND_AFTER.has(error.code)) {
      setTimeout(() => this.#unacked.has(clientMsgId) && this.send(frame),
        error.retry_after_ms ?? 1000);
      return;
    }
    this.#unacked.delete(clientMsgId);
    this.h.onSendFailed(frame, error);
  }

  #ping() {
    this.send({ type: 'ping', id: 'ping' });
    this.#expectWithin(PONG_TIMEOUT_MS);
  }

  // If no frame arrives within `ms`, the connection is dead even if the socket says otherwise.
  #expectWithin(ms) {
    clearTimeout(this.#deadline);
    this.#deadline = setTimeout(() => {
      this.#drop();
      this.#retry();
    }, ms);
  }

  #onClose(code) {
    this.#drop();
    if (code === CLOSE_UNAUTHORIZED) {
      this.stop();
      this.h.onAuthLost();
    } else {
      this.#retry();
    }
  }

  #drop() {
    clearInterval(this.#pingTimer);
    clearTimeout(this.#deadline);
    this.#welcomed = false;
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      ws.close();
    }
  }

  // Exponential backoff with jitter: 50-100% of min(30 s, 0.5 s * 2^attempt).
  #retry() {
    if (this.#stopped) return;
    if (!navigator.onLine) {
      this.#setState('offline');
      return;
    }
    this.#setState(this.#everOnline ? 'reconnecting' : 'connecting');
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** this.#attempt);
    this.#attempt += 1;
    this.#retryTimer = setTimeout(() => this.#connect(), ceiling * (0.5 + Math.random() / 2));
  }

  #setState(state) {
    if (state === this.state) return;
    this.state = state;
    this.h.onState(state);
  }
}
