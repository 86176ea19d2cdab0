//! Who is calling, and may they: bearer tokens checked by an interceptor, roles per
//! service, regions per authority token.
//!
//! With no tokens configured the server is in open mode (it only serves loopback, see
//! `main.rs`) and every caller is `Caller::Open`. Tokens are kept as SHA-256 hashes
//! and compared in constant time against every configured hash. Each token may make
//! `rate_token_requests_per_s` requests a second (burst the same; 0, the default, is no
//! limit); beyond it RATE_LIMITED.

use std::collections::BTreeSet;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use subtle::ConstantTimeEq;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::{token_sha256, CitizenTrust, Role, Token};
use crate::domain::catalog::Site;
use crate::domain::ids::{ChannelId, RegionId, SiteId};
use crate::service::error::Limiter;
use crate::service::{Actor, Regions, ServiceError};

/// The service a gate stands in front of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Booking,
    Capacity,
    /// The desk's SiteService.
    Site,
    /// gRPC reflection: any valid token.
    Reflection,
    /// Aggregates only: any valid token; with `public`, no token too.
    OpenData {
        public: bool,
    },
}

/// The one request quota every anonymous caller of a public service shares.
pub type AnonymousLimiter = Arc<governor::DefaultDirectRateLimiter>;

/// `per_second` anonymous requests in all (burst the same; at least 1).
pub fn anonymous_limiter(per_second: u32) -> AnonymousLimiter {
    let n = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
    Arc::new(RateLimiter::direct(Quota::per_second(n).allow_burst(n)))
}

/// The authenticated caller, put in the request's extensions by the gate.
#[derive(Clone, Debug)]
pub enum Caller {
    /// Open mode: no tokens configured.
    Open,
    Token {
        name: Arc<str>,
        role: Role,
        regions: Arc<BTreeSet<RegionId>>,
        /// A `site` token's sites.
        sites: Arc<BTreeSet<SiteId>>,
        citizens: CitizenTrust,
        /// Its bookings' channel (a release may reserve places for it).
        channel: ChannelId,
    },
}

impl Caller {
    /// The channel the caller's bookings are made through (`web` in open mode).
    pub fn channel(&self) -> ChannelId {
        match self {
            Caller::Open => ChannelId::web(),
            Caller::Token { channel, .. } => channel.clone(),
        }
    }

    /// Who the audit log names for this caller's changes.
    pub fn actor(&self) -> String {
        match self {
            Caller::Open => "open-mode".to_string(),
            Caller::Token { name, .. } => name.to_string(),
        }
    }

    /// The caller as the engine checks it: its name and the regions it may act on.
    pub fn authority(&self) -> Actor {
        match self {
            Caller::Open => Actor::everywhere(&self.actor()),
            Caller::Token {
                name,
                role: Role::Authority,
                regions,
                ..
            } => Actor {
                name: name.to_string(),
                regions: Regions::Only(Arc::clone(regions)),
            },
            // Admins; frontends never pass the capacity gate.
            Caller::Token { name, .. } => Actor::everywhere(name),
        }
    }

    /// Whether the caller may change and read the sites of `region`.
    pub fn check_region(&self, region: &RegionId) -> Result<(), Status> {
        Ok(self.authority().check_region(region)?)
    }

    /// The site, if the caller may read it; another region's site and an unknown one
    /// get the same refusal (see `Actor::check_site`).
    pub fn check_site(&self, site: Option<&Arc<Site>>) -> Result<(), Status> {
        self.authority().check_site(site)?;
        Ok(())
    }

    /// Whether the caller may work the desk of `site_id`: a site token of that site,
    /// an admin, or open mode.
    pub fn check_desk(&self, site_id: &SiteId) -> Result<(), Status> {
        match self {
            Caller::Open
            | Caller::Token {
                role: Role::Admin, ..
            } => Ok(()),
            Caller::Token { sites, .. } if sites.contains(site_id) => Ok(()),
            Caller::Token { name, .. } => Err(Status::permission_denied(format!(
                "token {name:?} may work the desks of its own sites only"
            ))),
        }
    }

    /// Whether the caller may act on every region at once (an unscoped export, a
    /// series, the audit log, a backup); `what` says what spans them, for the refusal.
    pub fn check_all_regions(&self, what: &str) -> Result<(), Status> {
        match self {
            Caller::Open
            | Caller::Token {
                role: Role::Admin, ..
            } => Ok(()),
            Caller::Token { name, .. } => Err(Status::permission_denied(format!(
                "token {name:?} may act on its own regions only, and {what}"
            ))),
        }
    }

    /// The caller the gate recorded for this request.
    pub fn of<T>(request: &Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::internal("the request passed no authentication gate"))
    }
}

/// Requests per token, shared by the gates of both services.
pub type TokenLimiter = Option<Arc<DefaultKeyedRateLimiter<Arc<str>>>>;

/// `per_second` requests per token (burst the same); 0: no limit.
pub fn token_limiter(per_second: u32) -> TokenLimiter {
    NonZeroU32::new(per_second)
        .map(|n| Arc::new(RateLimiter::keyed(Quota::per_second(n).allow_burst(n))))
}

/// The interceptor in front of one service.
#[derive(Clone)]
pub struct Gate {
    tokens: Arc<[Token]>,
    service: Service,
    limiter: TokenLimiter,
    /// Anonymous callers of a public service (`OpenData { public: true }`).
    anonymous: AnonymousLimiter,
    /// How callers name citizens in open mode (no tokens).
    open_citizens: CitizenTrust,
}

impl Gate {
    pub fn new(
        tokens: &[Token],
        service: Service,
        (limiter, anonymous): (TokenLimiter, AnonymousLimiter),
        open_citizens: CitizenTrust,
    ) -> Self {
        Self {
            tokens: tokens.into(),
            service,
            limiter,
            anonymous,
            open_citizens,
        }
    }

    /// How this caller names citizens (put in the request's extensions with it).
    fn citizens(&self, caller: &Caller) -> CitizenTrust {
        match caller {
            Caller::Open => self.open_citizens,
            Caller::Token { citizens, .. } => *citizens,
        }
    }

    /// The token's request quota (tokens are few, and all configured: no retention).
    fn count_request(&self, name: &Arc<str>) -> Result<(), Status> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(name).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            Status::from(ServiceError::rate_limited(Limiter::Token, wait))
        })
    }

    fn authenticate(&self, request: &Request<()>) -> Result<Caller, Status> {
        if self.tokens.is_empty() {
            return Ok(Caller::Open);
        }
        let anonymous = request.metadata().get("authorization").is_none();
        if anonymous && self.service == (Service::OpenData { public: true }) {
            self.anonymous.check().map_err(|not_until| {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Status::from(ServiceError::rate_limited(Limiter::Anonymous, wait))
            })?;
            return Ok(Caller::Open);
        }
        let unauthenticated =
            || Status::unauthenticated("send a valid token as `authorization: Bearer <token>`");
        // Exactly one: of two, which one a proxy or a client library keeps is anyone's
        // guess (the first used to win silently), as for `x-citizen-assertion`.
        let mut sent = request.metadata().get_all("authorization").iter();
        let header = match (sent.next(), sent.next()) {
            (Some(one), None) => one.to_str().ok(),
            _ => None,
        }
        .ok_or_else(unauthenticated)?;
        // The scheme's name is case-insensitive (RFC 9110 11.1).
        let presented = (header.get(..7))
            .filter(|scheme| scheme.eq_ignore_ascii_case("Bearer "))
            .map(|_| header[7..].trim())
            .filter(|token| !token.is_empty())
            .ok_or_else(unauthenticated)?;
        let hash = token_sha256(presented);
        // Every configured hash is compared, whatever matches first.
        let mut found = None;
        for token in self.tokens.iter() {
            if bool::from(token.sha256.ct_eq(&hash)) {
                found = Some(token);
            }
        }
        let token = found.ok_or_else(unauthenticated)?;
        Ok(Caller::Token {
            name: token.name.as_str().into(),
            role: token.role,
            regions: Arc::new(token.regions.clone()),
            sites: Arc::new(token.sites.clone()),
            citizens: token.citizens,
            channel: token.channel.clone(),
        })
    }
}

impl Interceptor for Gate {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.authenticate(&request)?;
        if let Caller::Token { name, role, .. } = &caller {
            let allowed = matches!(
                (self.service, role),
                (_, Role::Admin)
                    | (Service::Reflection, _)
                    | (Service::OpenData { .. }, _)
                    | (Service::Booking, Role::Frontend)
                    | (Service::Capacity, Role::Authority)
                    | (Service::Site, Role::Site)
            );
            if !allowed {
                return Err(Status::permission_denied(format!(
                    "token {name:?} ({role:?}) may not call the {:?} service",
                    self.service
                )));
            }
            self.count_request(name)?;
        }
        let citizens = self.citizens(&caller);
        request.extensions_mut().insert(citizens);
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}
