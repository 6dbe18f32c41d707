"""The web console at ``/console``: a page shell and static assets served by the API itself
(no CDN, no build step). The pages call the same JSON API as every client, with the API key the
user signs in with (kept in the tab's session storage, sent as a header)."""
