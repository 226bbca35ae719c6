"""Browse a decomposition: a static site (``apd-lens browse``) over a run's harvest, attribution graph
and clusters; it opens from ``file://`` or is served on localhost."""

from apd_lens.browse.command import browse, harvest_run
from apd_lens.browse.runs import BrowseError, OpenedRun, open_run
from apd_lens.browse.serve import make_server, serve
from apd_lens.browse.site import build_site

__all__ = ["BrowseError", "OpenedRun", "browse", "build_site", "harvest_run", "make_server", "open_run", "serve"]
