// The chatd web client: the page, wired to the HTTP API and the WebSocket session.
// Everything from the server or a user is rendered as text (see dom.js).

import { Api } from './api.js';
import { Connection } from './connection.js';
import { $, el, reconcile } from './dom.js';
import { MessageList } from './messages.js';
import { Room } from './room.js';

const SESSION_KEY = 'chatd.session';
const TYPING_RESEND_MS = 3000;
const TYPING_IDLE_MS = 4000;
const TYPING_SHOW_MS = 6000;
const CONN_LABELS = {
  connecting: 'Connecting…', online: 'Online', reconnecting: 'Reconnecting…', offline: 'Offline',
};
const CONN_NOTES = {
  connecting: 'Connecting…',
  reconnecting: 'Connection lost. Reconnecting…',
  offline: 'You are offline. Messages will be sent when the network is back.',
};

const ui = {
  auth: $('#auth-view'),
  authForm: $('#auth-form'),
  authError: $('[data-testid=auth-error]'),
  app: $('#app'),
  me: $('[data-testid=me]'),
  conn: $('[data-testid=connection-state]'),
  connNote: $('[data-testid=connection-note]'),
  roomList: $('[data-testid=room-list]'),
  roomsEmpty: $('[data-testid=room-list-empty]'),
  placeholder: $('.chat .placeholder'),
  header: $('.chat header'),
  title: $('[data-testid=chat-title]'),
  presence: $('[data-testid=chat-presence]'),
  membersButton: $('#members'),
  scroller: $('[data-testid=message-scroller]'),
  older: $('[data-testid=load-older]'),
  messages: $('[data-testid=message-list]'),
  typing: $('[data-testid=typing-indicator]'),
  composer: $('[data-testid=composer]'),
  input: $('[data-testid=composer-input]'),
  directDialog: $('#direct-dialog'),
  groupDialog: $('#group-dialog'),
  membersDialog: $('#members-dialog'),
  memberList: $('[data-testid=member-list]'),
  addMember: $('[data-testid=add-member-form]'),
  toast: $('[data-testid=toast]'),
};

const api = new Api(() => signOut());
let conn = null;
let me = null;                  // the session: {token, user_id, username, expires_at}
let openId = null;              // the room shown in the chat view
const rooms = new Map();        // room_id -> Room
const names = new Map();        // user_id -> username
const online = new Map();       // user_id -> bool, from presence frames
const roomNodes = new Map();    // room_id -> <li> in the room list
const deliveredDue = new Set(); // rooms whose `delivered` watermark is to be sent

// --- session ------------------------------------------------------------------------------

function loadSession() {
  try {
    const session = JSON.parse(localStorage.getItem(SESSION_KEY));
    return session?.token && session.expires_at > Date.now() ? session : null;
  } catch {
    return null;
  }
}

async function start(session) {
  me = session;
  api.token = session.token;
  names.set(me.user_id, me.username);
  ui.me.textContent = me.username;
  ui.auth.hidden = true;
  ui.app.hidden = false;
  renderConnState('connecting');
  conn = new Connection({
    token: () => me.token,
    resume: () => Object.fromEntries([...rooms.values()].map((r) => [r.id, r.lastSeq])),
    onWelcome, onFrame, onAck, onSendFailed, onState: renderConnState, onAuthLost: signOut,
  });
  try {
    await refreshRooms(); // first: the resume points come from the room list
  } catch (e) {
    showError(e);
  }
  if (me === session) conn.start(); // unless signed out meanwhile
}

function signOut() {
  conn?.stop();
  conn = null;
  me = null;
  api.token = null;
  localStorage.removeItem(SESSION_KEY);
  closeRoom();
  for (const room of rooms.values()) for (const timer of room.typing.values()) clearTimeout(timer);
  rooms.clear();
  names.clear();
  online.clear();
  roomNodes.clear();
  ui.roomList.replaceChildren();
  for (const dialog of document.querySelectorAll('dialog[open]')) dialog.close();
  ui.app.hidden = true;
  ui.auth.hidden = false;
  document.title = 'chatd';
  ui.authForm.elements.username.focus();
}

ui.authForm.addEventListener('submit', async (event) => {
  event.preventDefault();
  const form = new FormData(ui.authForm);
  const username = form.get('username').trim().toLowerCase();
  ui.authError.textContent = '';
  setBusy(ui.authForm, true);
  try {
    if (event.submitter?.value === 'register') await api.register(username, form.get('password'));
    const session = await api.login(username, form.get('password'));
    localStorage.setItem(SESSION_KEY, JSON.stringify(session));
    ui.authForm.reset();
    start(session);
  } catch (e) {
    ui.authError.textContent = e.message;
  } finally {
    setBusy(ui.authForm, false);
  }
});

$('#logout').addEventListener('click', async () => {
  await api.logout().catch(() => {}); // revoked or unreachable: forget it here either way
  signOut();
});

// --- rooms --------------------------------------------------------------------------------

let roomsLoad = null;
let roomsAgain = false;

// GET /rooms, applied; a call while one runs makes it run once more (the list may be stale).
function refreshRooms() {
  if (roomsLoad) {
    roomsAgain = true;
    return roomsLoad;
  }
  const session = me;
  roomsLoad = (async () => {
    do {
      roomsAgain = false;
      const { rooms: list } = await api.rooms();
      if (me !== session) return;
      applyRooms(list);
    } while (roomsAgain);
  })().finally(() => { roomsLoad = null; });
  return roomsLoad;
}

function applyRooms(list) {
  const listed = new Set(list.map((r) => r.room_id));
  for (const id of rooms.keys()) if (!listed.has(id)) dropRoom(id);
  for (const summary of list) {
    let room = rooms.get(summary.room_id);
    if (!room) {
      room = new Room(summary);
      room.lastSeq = summary.last_seq;
      room.unread = summary.unread;
      rooms.set(room.id, room);
    }
    setMeta(room, summary);
    if (summary.last_message && summary.last_message.seq > (room.lastMessage?.seq ?? 0)) {
      room.lastMessage = summary.last_message;
    }
  }
  renderRoomList();
}

async function refreshRoom(room) {
  try {
    setMeta(room, await api.room(room.id));
    renderRoomList();
    if (room.id === openId) await loadReceipts(room);
  } catch (e) {
    if (e.status === 404) dropRoom(room.id);
    else showError(e);
  }
}

// Members may carry their `username` (a server extension); else names come from look-ups.
function setMeta(room, meta) {
  room.meta = meta;
  for (const member of meta.members) if (member.username) names.set(member.user_id, member.username);
  if (room.id === openId) {
    renderHeader();
    renderMembers();
  }
}

function dropRoom(id) {
  rooms.delete(id);
  if (id === openId) closeRoom();
  renderRoomList();
}

function nameOf(userId) {
  return names.get(userId) ?? `user ${userId.slice(0, 6)}`;
}

function presenceOf(userId) {
  if (userId === me.user_id) return 'online';
  return online.has(userId) ? (online.get(userId) ? 'online' : 'offline') : 'unknown';
}

function peer(room) {
  return room.meta.kind === 'direct' ? room.others(me.user_id)[0]?.user_id : undefined;
}

function roomTitle(room) {
  const other = peer(room);
  if (room.meta.kind === 'group') return room.meta.name;
  return other ? nameOf(other) : 'Direct chat';
}

function preview(room) {
  const last = room.lastMessage;
  if (!last) return 'No messages yet';
  if (last.sender_id === me.user_id) return `You: ${last.body}`;
  return room.meta.kind === 'group' ? `${nameOf(last.sender_id)}: ${last.body}` : last.body;
}

function renderRoomList() {
  if (!me) return;
  const sorted = [...rooms.values()].sort((a, b) => b.activity - a.activity);
  for (const id of roomNodes.keys()) if (!rooms.has(id)) roomNodes.delete(id);
  reconcile(ui.roomList, sorted.map(roomNode));
  ui.roomsEmpty.hidden = sorted.length > 0;
  const unread = sorted.reduce((sum, room) => sum + room.unread, 0);
  document.title = unread ? `(${unread}) chatd` : 'chatd';
}

function roomNode(room) {
  let li = roomNodes.get(room.id);
  if (!li) {
    li = el('li', {}, el('button', {
      type: 'button', class: 'room', 'data-testid': 'room-item', 'data-room-id': room.id,
      onclick: () => openRoom(room.id),
    }));
    roomNodes.set(room.id, li);
  }
  const other = peer(room);
  const button = li.firstChild;
  button.classList.toggle('current', room.id === openId);
  button.replaceChildren(...[
    other ? el('span', { class: 'dot', 'data-presence': presenceOf(other) }) : null,
    el('span', { class: 'name', 'data-testid': 'room-name', text: roomTitle(room) }),
    room.unread
      ? el('span', { class: 'badge', 'data-testid': 'room-unread', text: String(room.unread) })
      : null,
    el('span', { class: 'preview', 'data-testid': 'room-last-message', text: preview(room) }),
  ].filter(Boolean));
  return li;
}

// --- the WebSocket session ---------------------------------------------------------------

function renderConnState(state) {
  ui.conn.dataset.state = state;
  ui.conn.textContent = CONN_LABELS[state];
  ui.connNote.textContent = CONN_NOTES[state] ?? '';
  ui.connNote.hidden = state === 'online';
}

function onWelcome(welcome) {
  for (const p of welcome.presence ?? []) online.set(p.user_id, p.online); // who is on now
  const listed = new Set(welcome.rooms.map((r) => r.room_id));
  for (const id of rooms.keys()) if (!listed.has(id)) dropRoom(id); // removed while away
  for (const mark of welcome.rooms) {
    rooms.get(mark.room_id)?.setOwnMarks(me.user_id, mark.delivered_seq, mark.read_seq);
  }
  if (welcome.rooms.some((r) => !rooms.has(r.room_id))) refreshRooms().catch(showError);
  for (const room of rooms.values()) markDelivered(room);
  const room = rooms.get(openId);
  if (room) refreshRoom(room); // receipts and members may have moved while we were away
  renderRoomList();
  markRead();
}

function onFrame(frame) {
  switch (frame.type) {
    case 'message': onMessage(frame); break;
    case 'receipt': onReceipt(frame); break;
    case 'typing': onTyping(frame); break;
    case 'presence': onPresence(frame); break;
    case 'member': onMember(frame); break;
    case 'error': console.warn(`chatd: ${frame.code}: ${frame.message}`); break;
    default: // a newer server's frame: nothing to do with it
  }
}

function onMessage(msg) {
  const room = rooms.get(msg.room_id);
  if (!room) { // we were just added: the fresh list brings the room, this message in its history
    refreshRooms().catch(showError);
    return;
  }
  if (!room.add(msg, me.user_id, { live: true })) return;
  clearTimeout(room.typing.get(msg.sender_id));
  room.typing.delete(msg.sender_id);
  markDelivered(room);
  if (room.id === openId) {
    renderMessages({ follow: msg.sender_id === me.user_id });
    renderTyping();
  }
  renderRoomList();
}

function onAck(ack) {
  const pending = rooms.get(ack.room_id)?.pending.get(ack.client_msg_id);
  if (!pending) return; // its echo came first
  pending.seq = ack.seq;
  pending.ts = ack.ts;
  if (ack.room_id === openId) renderMessages();
}

function onSendFailed(frame, error) {
  const pending = rooms.get(frame.room_id)?.pending.get(frame.client_msg_id);
  if (!pending) return;
  pending.error = error.message;
  if (frame.room_id === openId) renderMessages();
}

function onReceipt(receipt) {
  const room = rooms.get(receipt.room_id);
  if (!room) return;
  if (receipt.user_id === me.user_id) {
    room.setOwnMarks(me.user_id, receipt.delivered_seq, receipt.read_seq);
    renderRoomList();
  } else {
    room.setReceipt(receipt.user_id, receipt.delivered_seq, receipt.read_seq);
  }
  if (room.id === openId) renderMessages();
}

function onTyping(typing) {
  const room = rooms.get(typing.room_id);
  if (!room || typing.user_id === me.user_id) return;
  clearTimeout(room.typing.get(typing.user_id));
  room.typing.delete(typing.user_id);
  if (typing.active) {
    room.typing.set(typing.user_id, setTimeout(() => {
      room.typing.delete(typing.user_id);
      renderTyping();
    }, TYPING_SHOW_MS));
  }
  renderTyping();
}

function onPresence(presence) {
  online.set(presence.user_id, presence.online);
  renderRoomList();
  renderHeader();
  renderMembers();
}

function onMember(event) {
  const room = rooms.get(event.room_id);
  if (event.user_id !== me.user_id) {
    if (room) refreshRoom(room);
  } else if (event.event === 'removed') {
    dropRoom(event.room_id);
  } else {
    refreshRooms().catch(showError);
  }
}

// `delivered` is cumulative: one frame per room for a burst of messages.
function markDelivered(room) {
  if (!deliveredDue.size) setTimeout(flushDelivered, 50);
  deliveredDue.add(room);
}

function flushDelivered() {
  for (const room of deliveredDue) {
    const seq = room.newestSeq;
    if (seq > room.deliveredSeq && conn?.send({ type: 'delivered', room_id: room.id, seq })) {
      room.deliveredSeq = seq;
    }
  }
  deliveredDue.clear();
}

// `read` goes out for what is on screen, in a visible tab, in the open room.
function markRead() {
  const room = rooms.get(openId);
  const seq = messageList.newestVisible;
  if (!room || document.visibilityState !== 'visible' || !seq) return;
  if (seq > room.readSeq && conn?.send({ type: 'read', room_id: room.id, seq })) {
    room.setOwnMarks(me.user_id, seq, seq);
    renderRoomList();
  }
}

document.addEventListener('visibilitychange', markRead);

const messageList = new MessageList({
  list: ui.messages, scroller: ui.scroller, older: ui.older, nameOf, onSeen: markRead,
  onRetry: retrySend,
});

// --- the chat view ------------------------------------------------------------------------

function openRoom(id) {
  const room = rooms.get(id);
  if (openId !== id) {
    closeRoom();
    openId = id;
    ui.input.value = room.draft;
  }
  ui.app.classList.add('room-open');
  ui.placeholder.hidden = true;
  ui.header.hidden = ui.scroller.hidden = ui.composer.hidden = false;
  fitInput();
  renderHeader();
  renderMessages({ follow: true });
  renderTyping();
  renderRoomList();
  if (!room.loaded) loadPage(room);
  loadReceipts(room);
  ui.input.focus();
}

function closeRoom() {
  stopTyping();
  const room = rooms.get(openId);
  if (room) room.draft = ui.input.value;
  openId = null;
  messageList.clear();
  ui.input.value = '';
  ui.typing.textContent = '';
  ui.app.classList.remove('room-open');
  ui.placeholder.hidden = false;
  ui.header.hidden = ui.scroller.hidden = ui.composer.hidden = true;
}

$('[data-testid=back-button]').addEventListener('click', () => {
  closeRoom();
  renderRoomList();
});

// The latest page on first open, then the page before the oldest message we hold.
async function loadPage(room) {
  if (room.loading) return;
  room.loading = true;
  const before = room.loaded ? room.oldestSeq : undefined;
  try {
    const page = await api.messages(room.id, before);
    for (const msg of page.messages) room.add(msg, me.user_id, { live: false });
    room.hasMore = page.has_more;
    room.loaded = true;
    markDelivered(room);
    if (room.id === openId) renderMessages({ follow: !before, prepended: Boolean(before) });
  } catch (e) {
    showError(e);
  } finally {
    room.loading = false;
  }
}

async function loadReceipts(room) {
  try {
    const { receipts } = await api.receipts(room.id);
    for (const r of receipts) {
      if (r.user_id === me.user_id) room.setOwnMarks(me.user_id, r.delivered_seq, r.read_seq);
      else room.setReceipt(r.user_id, r.delivered_seq, r.read_seq);
    }
    if (room.id === openId) renderMessages();
  } catch (e) {
    showError(e);
  }
}

ui.older.addEventListener('click', () => loadPage(rooms.get(openId)));
ui.scroller.addEventListener('scroll', () => {
  const room = rooms.get(openId);
  if (room?.hasMore && ui.scroller.scrollTop < 64) loadPage(room);
}, { passive: true });

function renderHeader() {
  const room = rooms.get(openId);
  if (!room) return;
  const other = peer(room);
  ui.title.textContent = roomTitle(room);
  ui.presence.hidden = !other;
  ui.presence.dataset.presence = other ? presenceOf(other) : 'unknown';
  ui.membersButton.hidden = room.meta.kind !== 'group';
}

function renderTyping() {
  const room = rooms.get(openId);
  const who = room ? [...room.typing.keys()].map(nameOf) : [];
  ui.typing.textContent = who.length === 0 ? ''
    : `${who.join(', ')} ${who.length === 1 ? 'is' : 'are'} typing…`;
}

function renderMessages(options) {
  const room = rooms.get(openId);
  if (room) messageList.render(room, me.user_id, options);
}

function retrySend(room, clientMsgId) {
  const pending = room.pending.get(clientMsgId);
  pending.error = null;
  conn.sendMessage(room.id, clientMsgId, pending.body);
  renderMessages();
}

// --- composing ----------------------------------------------------------------------------

let typingRoom = null;
let typingSentAt = 0;
let typingIdle = 0;

ui.input.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.input.addEventListener('input', () => {
  fitInput();
  clearTimeout(typingIdle);
  typingIdle = setTimeout(stopTyping, TYPING_IDLE_MS);
  if (Date.now() - typingSentAt > TYPING_RESEND_MS
      && conn?.send({ type: 'typing', room_id: openId, active: true })) {
    typingRoom = openId;
    typingSentAt = Date.now();
  }
});

function stopTyping() {
  clearTimeout(typingIdle);
  if (typingRoom) conn?.send({ type: 'typing', room_id: typingRoom, active: false });
  typingRoom = null;
  typingSentAt = 0;
}

function fitInput() {
  const input = ui.input;
  input.style.height = 'auto';
  const borders = input.offsetHeight - input.clientHeight;
  input.style.height = `${Math.min(input.scrollHeight + borders, 160)}px`;
}

// Shown at once; the outbox sends it now or after the next reconnect.
ui.composer.addEventListener('submit', (event) => {
  event.preventDefault();
  const room = rooms.get(openId);
  const body = ui.input.value;
  if (!room || !body.trim()) return;
  const clientMsgId = Array.from(crypto.getRandomValues(new Uint8Array(16)),
    (byte) => byte.toString(16).padStart(2, '0')).join('');
  room.pending.set(clientMsgId, {
    client_msg_id: clientMsgId, sender_id: me.user_id, body, ts: Date.now(), seq: 0, error: null,
  });
  conn.sendMessage(room.id, clientMsgId, body);
  ui.input.value = '';
  fitInput();
  stopTyping();
  renderMessages({ follow: true });
});

// --- dialogs ------------------------------------------------------------------------------

for (const button of document.querySelectorAll('[data-close]')) {
  button.addEventListener('click', () => button.closest('dialog').close());
}

for (const dialog of document.querySelectorAll('dialog')) {
  dialog.addEventListener('close', () => {
    for (const form of dialog.querySelectorAll('form')) form.reset();
    $('.error', dialog).textContent = '';
  });
}

function onSubmit(form, action) {
  const error = $('.error', form.closest('dialog'));
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    error.textContent = '';
    setBusy(form, true);
    try {
      await action(new FormData(form));
      form.reset();
    } catch (e) {
      error.textContent = e.message;
    } finally {
      setBusy(form, false);
    }
  });
}

async function lookUp(username) {
  const user = await api.userByName(username.trim().toLowerCase());
  names.set(user.user_id, user.username);
  return user;
}

$('#new-direct').addEventListener('click', () => ui.directDialog.showModal());
onSubmit($('form', ui.directDialog), async (form) => {
  const user = await lookUp(form.get('username'));
  if (user.user_id === me.user_id) throw new Error('That is you: pick someone else.');
  const room = await api.createDirect(user.user_id);
  await refreshRooms();
  ui.directDialog.close();
  openRoom(room.room_id);
});

$('#new-group').addEventListener('click', () => ui.groupDialog.showModal());
onSubmit($('form', ui.groupDialog), async (form) => {
  const usernames = form.get('members').split(/[\s,]+/).filter(Boolean);
  const users = await Promise.all(usernames.map(lookUp));
  const room = await api.createGroup(form.get('name').trim(), users.map((u) => u.user_id));
  await refreshRooms();
  ui.groupDialog.close();
  openRoom(room.room_id);
});

ui.membersButton.addEventListener('click', () => {
  ui.membersDialog.showModal();
  renderMembers();
});

onSubmit(ui.addMember, async (form) => {
  const room = rooms.get(openId);
  const user = await lookUp(form.get('username'));
  await api.addMember(room.id, user.user_id);
  await refreshRoom(room);
});

$('#leave').addEventListener('click', async () => {
  const room = rooms.get(openId);
  if (!room || !confirm(`Leave “${roomTitle(room)}”?`)) return;
  try {
    await api.removeMember(room.id, me.user_id);
    ui.membersDialog.close();
    dropRoom(room.id);
  } catch (e) {
    $('.error', ui.membersDialog).textContent = e.message;
  }
});

// Owners manage everyone but themselves; admins manage plain members (the server decides).
function renderMembers() {
  const room = rooms.get(openId);
  if (!ui.membersDialog.open || !room) return;
  const myRole = room.role(me.user_id);
  const manager = myRole === 'owner' || myRole === 'admin';
  ui.memberList.replaceChildren(...room.meta.members.map((member) => {
    const self = member.user_id === me.user_id;
    const removable = manager && !self && member.role !== 'owner'
      && (member.role === 'member' || myRole === 'owner');
    return el('li', { 'data-testid': 'member-item', 'data-user-id': member.user_id },
      el('span', { class: 'dot', 'data-presence': presenceOf(member.user_id) }),
      el('span', { class: 'name', text: self ? `${nameOf(member.user_id)} (you)` : nameOf(member.user_id) }),
      el('span', { class: 'role', text: member.role }),
      removable ? el('button', {
        type: 'button', class: 'link danger', 'data-testid': 'member-remove', text: 'Remove',
        onclick: () => removeMember(room, member.user_id),
      }) : null);
  }));
  ui.addMember.hidden = !manager;
}

async function removeMember(room, userId) {
  try {
    await api.removeMember(room.id, userId);
    await refreshRoom(room);
  } catch (e) {
    $('.error', ui.membersDialog).textContent = e.message;
  }
}

// --- small things -------------------------------------------------------------------------

function setBusy(form, busy) {
  for (const button of form.querySelectorAll('button')) button.disabled = busy;
}

let toastTimer = 0;
function showError(error) {
  ui.toast.textContent = error.message;
  ui.toast.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { ui.toast.hidden = true; }, 6000);
}

async function boot() {
  const session = loadSession();
  if (!session) {
    signOut();
    return;
  }
  api.token = session.token;
  try {
    await api.me();
  } catch (e) {
    if (e.status === 401) return; // the API's 401 handler signed us out
  }
  start(session);
}

boot();
