"""`airlock view`: a web page over recorded runs, servable locally or by the service.

`view_app(runs_for)` is a Starlette app that shows each request the runs of the
`RunSource` that `runs_for(request)` gives it (None: 401). `airlock view` gives every
request the local `runs/` directory, behind a per-start token on 127.0.0.1
(`runner.view.local`); the multi-tenant service mounts it with its own keys
(`tenant_runs_for`), which give a tenant `TenantRuns(runs_dir).of(tenant)` and the
operator `.everyone()`, so that a tenant sees only its own runs (404 for any other).

The page is static files shipped in the package (no CDN, no build step), under a
Content-Security-Policy that allows scripts from the page's own origin only; every
string of the log reaches the page as text.
"""

from runner.view.app import RunsFor, tenant_runs_for, view_app
from runner.view.source import LocalRuns, RunSource, TenantRuns

__all__ = ["LocalRuns", "RunSource", "RunsFor", "TenantRuns", "tenant_runs_for", "view_app"]
