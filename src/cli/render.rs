//! `virtgate render`: print the exact ruleset apply would load; change nothing.

use super::{Context, load_config};
use crate::reconcile;
use crate::state;

pub fn run(ctx: &Context) -> Result<bool, String> {
    let cfg = load_config(ctx)?;
    for d in &cfg.diagnostics {
        eprintln!("{d}");
    }
    let st = state::read_state(&state::state_file(&ctx.state_dir)).unwrap_or_default();
    let facts = reconcile::facts_for(ctx, &st);
    let plan = reconcile::plan_only(&cfg, &facts, &st).plan;
    let backend = ctx.backend_for(&cfg);
    print!("{}", backend.render(&plan.ruleset));
    Ok(true)
}
