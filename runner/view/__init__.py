"""`airlock view`: a web page over recorded runs, servable locally or by the service.

`view_app(source, authorize)` is a Starlette app that shows the runs a `RunSource`
holds, to whoever `authorize` lets in: `airlock view` puts it behind a per-start token
on 127.0.0.1 (`runner.view.local`); the multi-tenant service mounts it with its own
keys, so that a tenant sees only its own runs. The page is static files shipped in the
package (no CDN, no build step), under a Content-Security-Policy that allows scripts
from the page's own origin only; every string of the log reaches the page as text.
"""

from runner.view.app import view_app
from runner.view.source import ALL_RUNS, LocalRuns, RunSource, Viewer

__all__ = ["ALL_RUNS", "LocalRuns", "RunSource", "Viewer", "view_app"]
