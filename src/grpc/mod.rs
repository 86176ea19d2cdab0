//! The gRPC edge: tonic handlers, proto ↔ domain conversions, and the one
//! error → `Status` mapping. Proto types stop here (and at `server` and the clients).

pub mod assertion;
pub mod auth;
pub mod booking_service;
pub mod capacity_service;
pub mod codec;
pub mod connections;
pub mod convert;
pub mod convert_campaign;
pub mod convert_release;
pub mod convert_series;
pub mod deadline;
pub mod detached;
pub mod observe;
pub mod open_data_service;
pub mod peers;
pub mod proxy_protocol;
pub mod readiness;
pub mod receiving;
pub mod shed;
pub mod signature_batch;
pub mod site_service;
pub mod status;
pub mod stream_end;

pub use booking_service::BookingApi;
pub use capacity_service::CapacityApi;
pub use open_data_service::OpenDataApi;
pub use site_service::SiteApi;
