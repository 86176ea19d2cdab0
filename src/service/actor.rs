//! Who makes an authority write: the name the audit log records, and the regions it may
//! act on. The engine checks the regions under the authority lock, against the catalog
//! as it is then: a check made before the lock could be overtaken by another region's
//! write to the same site id.
//!
//! Site ids are one namespace, so an admin registers each new site to its region
//! (UpsertSite or an import with an admin token); a region-scoped authority then manages
//! its sites. It cannot create a site id, so it can neither squat another region's ids
//! nor learn which exist: every refusal it gets is the same.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::domain::catalog::Site;
use crate::domain::error::{DomainError, Missing};
use crate::domain::ids::RegionId;
use crate::service::ServiceError;

#[derive(Clone, Debug)]
pub struct Actor {
    /// The token's name (`open-mode`, `demo`), as the audit log shows it.
    pub name: String,
    pub regions: Regions,
}

/// The regions an actor may act on.
#[derive(Clone, Debug)]
pub enum Regions {
    /// Admins, open mode, the demo seeder.
    All,
    /// An authority token's regions.
    Only(Arc<BTreeSet<RegionId>>),
}

impl Actor {
    /// An actor that may act on every region.
    pub fn everywhere(name: &str) -> Self {
        Self {
            name: name.to_string(),
            regions: Regions::All,
        }
    }

    /// May create the site `site` (admins only), or change it (its region and, for a
    /// move, the region it leaves).
    pub fn check_upsert(
        &self,
        site: &Site,
        existing: Option<&Arc<Site>>,
    ) -> Result<(), ServiceError> {
        if existing.is_some() || matches!(self.regions, Regions::Only(_)) {
            self.check_site(existing)?;
        }
        self.check_region(&site.region_id)
    }

    /// May act on `region`.
    pub fn check_region(&self, region: &RegionId) -> Result<(), ServiceError> {
        match &self.regions {
            Regions::All => Ok(()),
            Regions::Only(regions) if regions.contains(region) => Ok(()),
            Regions::Only(_) => Err(self.denied()),
        }
    }

    /// The site, if it exists and is in the actor's regions. An unknown site is
    /// `SITE_NOT_FOUND` for an actor of every region, and the same refusal as another
    /// region's site for a region-scoped one: it learns nothing of other regions' ids.
    pub fn check_site<'a>(
        &self,
        site: Option<&'a Arc<Site>>,
    ) -> Result<&'a Arc<Site>, ServiceError> {
        match (site, &self.regions) {
            (Some(site), _) => self.check_region(&site.region_id).map(|()| site),
            (None, Regions::All) => Err(DomainError::NotFound(Missing::Site).into()),
            (None, Regions::Only(_)) => Err(self.denied()),
        }
    }

    fn denied(&self) -> ServiceError {
        ServiceError::RegionDenied {
            actor: self.name.clone(),
        }
    }
}
