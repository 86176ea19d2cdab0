//! `prenota.v1.OpenDataService` handlers: aggregates only, never a person.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::grpc::convert;
use crate::proto;
use crate::proto::open_data_service_server::OpenDataService;
use crate::service::Engine;

pub struct OpenDataApi {
    engine: Arc<Engine>,
}

impl OpenDataApi {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

#[tonic::async_trait]
impl OpenDataService for OpenDataApi {
    async fn get_availability_summary(
        &self,
        request: Request<proto::GetAvailabilitySummaryRequest>,
    ) -> Result<Response<proto::GetAvailabilitySummaryResponse>, Status> {
        let today = convert::utc_date(self.engine.clock().now_unix_ms());
        let query = convert::summary_from_proto(request.into_inner(), self.engine.limits(), today)?;
        let page = self.engine.availability_summary(&query)?;
        Ok(Response::new(convert::summary_to_proto(&page)))
    }
}
