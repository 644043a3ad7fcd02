//! The paging of list calls. As in SPIRE, a page size of 0 (or less) asks for everything in one
//! message, which clients written for SPIRE rely on; a positive size is capped at
//! [`MAX_PAGE_SIZE`], so a client asking for a page always gets one that fits under gRPC's
//! 4 MB message limit, and follows `next_page_token` for the rest. A token is the key of the
//! last item of the previous page (an entry ID, an exception ID), as the datastore's are.

use crate::datastore::PageRequest;

/// The most items one page holds, whatever the client asked for: 1,000 entries of a few
/// kilobytes each stay well under gRPC's 4 MB message limit.
pub const MAX_PAGE_SIZE: u32 = 1_000;

/// The page a list call asks for: `None` (everything) for a page size of 0 or less, otherwise
/// at most [`MAX_PAGE_SIZE`] items after `page_token`.
pub(crate) fn requested_page(page_size: i32, page_token: &str) -> Option<PageRequest> {
    let size = u32::try_from(page_size).ok().filter(|size| *size > 0)?;
    Some(PageRequest {
        token: Some(page_token.to_owned()).filter(|token| !token.is_empty()),
        size: size.min(MAX_PAGE_SIZE),
    })
}

/// One page of `items`, which are sorted by `key` and unique in it: those after the page's
/// token, at most its size, and the next page's token when more remain. `None` is everything.
pub(crate) fn page_of<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> &str,
    page: Option<&PageRequest>,
) -> (Vec<T>, Option<String>) {
    let Some(page) = page else {
        return (items, None);
    };
    let size = usize::try_from(page.size).unwrap_or(usize::MAX).max(1);
    let mut rest = items.into_iter().skip_while(|item| {
        page.token
            .as_deref()
            .is_some_and(|token| key(item) <= token)
    });
    let found: Vec<T> = rest.by_ref().take(size).collect();
    let next = if rest.next().is_some() {
        found.last().map(|item| key(item).to_owned())
    } else {
        None
    };
    (found, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_size_of_zero_or_less_is_everything_and_a_large_one_is_capped() {
        assert_eq!(requested_page(0, "ignored"), None);
        assert_eq!(requested_page(-5, ""), None);
        assert_eq!(
            requested_page(10, ""),
            Some(PageRequest {
                token: None,
                size: 10
            })
        );
        assert_eq!(
            requested_page(i32::MAX, "e-9"),
            Some(PageRequest {
                token: Some("e-9".to_owned()),
                size: MAX_PAGE_SIZE
            })
        );
    }

    #[test]
    fn pages_of_a_sorted_list_resume_after_the_last_key() {
        let items: Vec<String> = (0..7).map(|n| format!("id-{n}")).collect();
        let mut page = requested_page(3, "");
        let mut seen = Vec::new();
        let mut n_pages = 0;
        loop {
            let (found, next) = page_of(items.clone(), String::as_str, page.as_ref());
            assert!(found.len() <= 3);
            seen.extend(found);
            n_pages += 1;
            match next {
                Some(token) => page = requested_page(3, &token),
                None => break,
            }
        }
        assert_eq!(seen, items);
        assert_eq!(n_pages, 3);
        // A page that ends exactly at the last item has no next page.
        let (found, next) = page_of(
            items.clone(),
            String::as_str,
            requested_page(7, "").as_ref(),
        );
        assert_eq!((found.len(), next), (7, None));
        let (found, next) = page_of(items, String::as_str, None);
        assert_eq!((found.len(), next), (7, None));
    }
}
