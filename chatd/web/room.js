// The client's model of one room: its messages by seq, watermarks, receipts and our unacked sends.

export class Room {
  lastSeq = 0;          // every seq up to this exists; later ones reach us live (the resume point)
  readSeq = 0;          // our own watermarks (any of our devices)
  deliveredSeq = 0;
  unread = 0;
  lastMessage = null;
  msgs = new Map();     // seq -> message, received live or paged in over HTTP
  pending = new Map();  // client_msg_id -> our message until its echo arrives
  receipts = new Map(); // user_id -> {delivered_seq, read_seq}
  typing = new Map();   // user_id -> timer that ends the indicator
  loaded = false;       // the latest page was fetched
  hasMore = false;      // older messages exist than the oldest in `msgs`
  loading = false;
  draft = '';           // the composer's text while another room is open

  constructor(meta) {
    this.id = meta.room_id;
    this.meta = meta;
  }

  get activity() {
    return this.lastMessage?.ts ?? this.meta.created_at;
  }

  get oldestSeq() {
    return Math.min(...this.msgs.keys());
  }

  get newestSeq() {
    return this.msgs.size ? Math.max(...this.msgs.keys()) : 0;
  }

  role(userId) {
    return this.meta.members.find((m) => m.user_id === userId)?.role;
  }

  others(me) {
    return this.meta.members.filter((m) => m.user_id !== me);
  }

  // Stores a message unless its seq is known (dedupe); true if it was new.
  // Only live messages move `lastSeq`: a page fetched over HTTP may be ahead of the socket.
  add(msg, me, { live }) {
    if (this.msgs.has(msg.seq)) return false;
    this.msgs.set(msg.seq, msg);
    if (msg.sender_id === me) this.pending.delete(msg.client_msg_id);
    if (live) {
      this.lastSeq = Math.max(this.lastSeq, msg.seq);
      if (msg.sender_id !== me && msg.seq > this.readSeq) this.unread += 1;
    }
    if (!this.lastMessage || msg.seq > this.lastMessage.seq) this.lastMessage = msg;
    return true;
  }

  setReceipt(userId, deliveredSeq, readSeq) {
    const old = this.receipts.get(userId) ?? { delivered_seq: 0, read_seq: 0 };
    this.receipts.set(userId, {
      delivered_seq: Math.max(old.delivered_seq, deliveredSeq),
      read_seq: Math.max(old.read_seq, readSeq),
    });
  }

  setOwnMarks(me, deliveredSeq, readSeq) {
    this.deliveredSeq = Math.max(this.deliveredSeq, deliveredSeq, readSeq);
    this.readSeq = Math.max(this.readSeq, readSeq);
    const newer = [...this.msgs.values()].filter((m) => m.seq > this.readSeq);
    const gap = Math.max(0, this.lastSeq - this.readSeq);
    this.unread = newer.length === gap
      ? newer.filter((m) => m.sender_id !== me).length
      : Math.min(this.unread, gap);
  }

  // Status of our message `seq` (PROTOCOL.md s2), and who has read / got it.
  status(seq, me) {
    const others = this.others(me).map((m) => ({
      user_id: m.user_id, ...(this.receipts.get(m.user_id) ?? { delivered_seq: 0, read_seq: 0 }),
    }));
    const readBy = others.filter((r) => r.read_seq >= seq).map((r) => r.user_id);
    const deliveredTo = others.filter((r) => r.delivered_seq >= seq && r.read_seq < seq)
      .map((r) => r.user_id);
    const status = readBy.length === others.length ? 'read'
      : readBy.length + deliveredTo.length === others.length ? 'delivered' : 'sent';
    const waiting = others.map((r) => r.user_id)
      .filter((id) => !readBy.includes(id) && !deliveredTo.includes(id));
    return { status, readBy, deliveredTo, waiting };
  }

  // Messages by seq, then our sends still waiting for their echo; keyed by sender and
  // client_msg_id so a pending message and its stored copy are the same item.
  timeline(me) {
    const stored = [...this.msgs.values()].sort((a, b) => a.seq - b.seq);
    return [...stored, ...this.pending.values()].map((m) => ({
      ...m, key: `${m.sender_id}/${m.client_msg_id}`, mine: m.sender_id === me,
    }));
  }
}
