//! What the engine keeps in memory per feature, apart from the commands that change it:
//! the engine's fields are these types, and the feature modules (`availability`,
//! `campaigns`, `releases`, `series`) implement their commands on the engine. No file
//! here imports the engine, so no file imports one that imports it back.

pub mod campaigns;
pub mod releases;
pub mod series;
pub mod watchers;
