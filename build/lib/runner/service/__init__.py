"""The multi-tenant service (`airlock serve --config`): see DESIGN.md, "The service"."""
