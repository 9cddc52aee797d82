//! Bindings for PEFT's module-name rules (`crate::adapter`): rank/alpha pattern keys and
//! `target_modules`, so Python and the merge resolve them with one regex engine and one rule set.

use pyo3::prelude::*;

use crate::adapter::{first_pattern_keys, Targets};

/// For each module name, the index of the first `rank_pattern` / `alpha_pattern` key (in the
/// order given) that PEFT would pick for it, or None. A key that is not a valid regex raises
/// ValueError naming it.
#[pyfunction]
fn peft_pattern_keys(keys: Vec<String>, modules: Vec<String>) -> PyResult<Vec<Option<usize>>> {
    Ok(first_pattern_keys(&keys, &modules)?)
}

#[derive(FromPyObject)]
enum TargetArg {
    Regex(String),
    Names(Vec<String>),
}

/// Whether each module name is selected by `target_modules` (a full-match regex string, or a list
/// of names matched exactly or as a dotted suffix). A bad regex raises ValueError naming it.
#[pyfunction]
fn peft_targets(target: TargetArg, modules: Vec<String>) -> PyResult<Vec<bool>> {
    let targets = match target {
        TargetArg::Regex(p) => Targets::regex(&p)?,
        TargetArg::Names(n) => Targets::Names(n),
    };
    Ok(modules.iter().map(|m| targets.matches(m)).collect())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(peft_pattern_keys, m)?)?;
    m.add_function(wrap_pyfunction!(peft_targets, m)?)?;
    Ok(())
}
