"""Training recipes: what each training stage hands the one engine (`engine.Recipe`): its model,
its helpers with their roles, and one step of its objective. Run with `Engine(cfg, RECIPE, name).fit()`."""
