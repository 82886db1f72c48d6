// The HTTP API (/api/v1): JSON in and out, bearer token, errors as ApiError.

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export class Api {
  token = null;

  // onUnauthorized: called when a request made with a token gets 401 (expired or revoked).
  constructor(onUnauthorized) {
    this.onUnauthorized = onUnauthorized;
  }

  async call(method, path, body) {
    const headers = {};
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let response;
    try {
      response = await fetch(`/api/v1${path}`, {
        method, headers, body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch {
      throw new ApiError(0, 'network', 'The server cannot be reached.');
    }
    if (response.status === 204) return null;
    const data = await response.json().catch(() => null);
    if (response.ok) return data;
    if (response.status === 401 && this.token) this.onUnauthorized();
    const error = data?.error ?? {};
    throw new ApiError(response.status, error.code ?? 'internal',
      error.message ?? `HTTP ${response.status}`);
  }

  register(username, password) { return this.call('POST', '/register', { username, password }); }
  login(username, password) { return this.call('POST', '/login', { username, password }); }
  logout() { return this.call('POST', '/logout'); }
  me() { return this.call('GET', '/me'); }

  async userByName(username) {
    try {
      return await this.call('GET', `/users?username=${encodeURIComponent(username)}`);
    } catch (e) {
      if (e.status === 404) throw new ApiError(404, 'not_found', `No user named “${username}”.`);
      throw e;
    }
  }

  rooms() { return this.call('GET', '/rooms'); }
  room(roomId) { return this.call('GET', `/rooms/${encodeURIComponent(roomId)}`); }
  createGroup(name, members) { return this.call('POST', '/rooms', { kind: 'group', name, members }); }
  createDirect(userId) { return this.call('POST', '/rooms', { kind: 'direct', members: [userId] }); }
  addMember(roomId, userId) {
    return this.call('POST', `/rooms/${encodeURIComponent(roomId)}/members`, { user_id: userId });
  }
  removeMember(roomId, userId) {
    return this.call('DELETE',
      `/rooms/${encodeURIComponent(roomId)}/members/${encodeURIComponent(userId)}`);
  }
  receipts(roomId) { return this.call('GET', `/rooms/${encodeURIComponent(roomId)}/receipts`); }

  // The latest page, or the page just before `beforeSeq`; ascending by seq.
  messages(roomId, beforeSeq) {
    const query = beforeSeq === undefined ? 'limit=50' : `limit=50&before_seq=${beforeSeq}`;
    return this.call('GET', `/rooms/${encodeURIComponent(roomId)}/messages?${query}`);
  }
}
