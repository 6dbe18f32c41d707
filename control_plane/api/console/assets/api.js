// The JSON API, called with the API key the user signed in with. The key lives in this tab's
// session storage only (gone when the tab closes) and travels as a header, never in a URL.
const KEY = "openloops.apiKey";

export class SignedOut extends Error {}
export class NotFound extends Error {}
export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export const storedKey = () => sessionStorage.getItem(KEY);
export const storeKey = (key) => sessionStorage.setItem(KEY, key);
export const forgetKey = () => sessionStorage.removeItem(KEY);

// The path of a URL the server gave out (its base URL may name another host than the page's).
export const pathOf = (url) => {
  const u = new URL(url, location.origin);
  return u.pathname + u.search;
};

export async function api(path, { method = "GET", body, key = storedKey(), signal } = {}) {
  if (!key) throw new SignedOut("not signed in");
  const headers = { Authorization: `Api-Key ${key}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "omit",
    cache: "no-store",
    signal,
  });
  const text = await r.text();
  let data = text;
  if ((r.headers.get("content-type") || "").includes("json") && text) data = JSON.parse(text);
  const detail = (data && (data.detail || data.error || data.message)) || `${r.status} ${r.statusText}`;
  if (r.status === 401) {
    forgetKey();
    throw new SignedOut(typeof detail === "string" ? detail : "the API key was refused");
  }
  if (r.status === 404) throw new NotFound(typeof detail === "string" ? detail : "not found");
  if (!r.ok) throw new ApiError(r.status, typeof detail === "string" ? detail : JSON.stringify(detail), data);
  return data;
}
