"""The `pidray` command: dispatches to the bulk job (jobs/) and the endpoint (serve/), which never import each other."""
