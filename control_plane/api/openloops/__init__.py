"""``/v1/openloops``: openloops' own extensions, which neither the Loops nor the Tinker API has
(who a key is, the org's API keys, a run's activity and status history). The console uses
them; any client may."""
