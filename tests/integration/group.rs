//! Household bookings (PRODUCT.md part D, `BookGroup`) on a real server: one place each
//! for every member in one write, all or none; each member's own limit applies; a retry
//! returns the same bookings.

use crate::common;

use common::*;
use prenota::proto;
use tonic::Code;

fn group(slot_id: &str, citizens: &[&str], request_id: &str) -> proto::BookGroupRequest {
    proto::BookGroupRequest {
        slot_id: slot_id.into(),
        citizen_ids: citizens.iter().map(|c| c.to_string()).collect(),
        request_id: request_id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_household_books_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let slot = one_slot_site(&server, "family", 5).await;
    let mut client = server.booking().await;

    let booked = client
        .book_group(group(&slot, &["MUM", "DAD", "KID"], "g1"))
        .await
        .expect("the household is booked")
        .into_inner()
        .bookings;
    assert_eq!(booked.len(), 3);
    assert_eq!(site_stats(&server, "family").await.booked, 3);
    // Each member owns its booking.
    for (citizen, booking) in ["MUM", "DAD", "KID"].iter().zip(&booked) {
        let own = client
            .get_booking(proto::GetBookingRequest {
                booking_id: booking.booking_id.clone(),
                citizen_id: citizen.to_string(),
            })
            .await
            .expect("its own booking");
        assert_eq!(own.into_inner().booking.unwrap().slot_id, slot);
    }
    // A retry answers the same bookings and books nothing more.
    let again = client
        .book_group(group(&slot, &["MUM", "DAD", "KID"], "g1"))
        .await
        .unwrap()
        .into_inner()
        .bookings;
    let ids = |bookings: &[proto::Booking]| {
        let mut ids: Vec<String> = bookings.iter().map(|b| b.booking_id.clone()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&again), ids(&booked));

    // One member already booked: nobody is, and the answer says which (its place in
    // citizen_ids), never the booking.
    let status = client
        .book_group(group(&slot, &["GRANDMA", "KID"], "g2"))
        .await
        .unwrap_err();
    assert_eq!(
        (status.code(), reason(&status).as_deref()),
        (Code::AlreadyExists, Some("CITIZEN_ALREADY_BOOKED"))
    );
    assert_eq!(metadata(&status, "citizen_index").as_deref(), Some("1"));
    assert!(!status.message().contains(&booked[2].booking_id));
    // More members than places left: nobody is.
    let status = client
        .book_group(group(&slot, &["A", "B", "C"], "g3"))
        .await
        .unwrap_err();
    assert_eq!(reason(&status).as_deref(), Some("SLOT_FULL"));
    assert_eq!(site_stats(&server, "family").await.booked, 3);
    let grandma = client
        .list_citizen_bookings(proto::ListCitizenBookingsRequest {
            citizen_id: "GRANDMA".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        grandma.bookings.is_empty(),
        "no member of a refused group is booked"
    );

    // Malformed groups: every mistake named.
    let status = client
        .book_group(group(&slot, &["A", "B", "A"], "g4"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["citizen_ids[2]"]);
    let seven = ["1", "2", "3", "4", "5", "6", "7"];
    let status = client
        .book_group(group(&slot, &seven, "g5"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&status), ["citizen_ids"]);
    let status = client
        .book_group(group(&slot, &[], "g6"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    server.stop().await;
}
