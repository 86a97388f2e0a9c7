//! The Genesys Cloud region table (GENESYS.md, "Hosts") and how a `region` value becomes the
//! login and API base URLs.

/// `(region, domain)` for every region the official SDKs know.
pub const REGIONS: &[(&str, &str)] = &[
    ("us-east-1", "mypurecloud.com"),
    ("eu-west-1", "mypurecloud.ie"),
    ("ap-southeast-2", "mypurecloud.com.au"),
    ("ap-northeast-1", "mypurecloud.jp"),
    ("eu-central-1", "mypurecloud.de"),
    ("us-west-2", "usw2.pure.cloud"),
    ("ca-central-1", "cac1.pure.cloud"),
    ("ap-northeast-2", "apne2.pure.cloud"),
    ("eu-west-2", "euw2.pure.cloud"),
    ("ap-south-1", "aps1.pure.cloud"),
    ("us-east-2", "use2.us-gov-pure.cloud"),
    ("sa-east-1", "sae1.pure.cloud"),
    ("me-central-1", "mec1.pure.cloud"),
    ("ap-northeast-3", "apne3.pure.cloud"),
    ("eu-central-2", "euc2.pure.cloud"),
    ("mx-central-1", "mxc1.pure.cloud"),
    ("ap-southeast-1", "apse1.pure.cloud"),
    ("eusc-de-east-1", "edee1.eusc-pure.cloud"),
];

/// The domain for a region name, or the value itself when it is a bare domain
/// (new regions appear over time). `None` when it is neither.
pub fn domain_for(region: &str) -> Option<String> {
    let region = region.trim();
    if let Some((_, domain)) = REGIONS.iter().find(|(name, _)| *name == region) {
        return Some((*domain).to_string());
    }
    let looks_like_domain = region.contains('.')
        && region.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    looks_like_domain.then(|| region.to_ascii_lowercase())
}

/// `(login base URL, API base URL)` for a domain, as the SDKs derive them.
pub fn urls_for(domain: &str) -> (String, String) {
    (
        format!("https://login.{domain}"),
        format!("https://api.{domain}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_eighteen_regions_resolve() {
        assert_eq!(REGIONS.len(), 18);
        for (name, domain) in REGIONS {
            assert_eq!(domain_for(name).as_deref(), Some(*domain));
        }
        assert_eq!(domain_for("us-east-1").as_deref(), Some("mypurecloud.com"));
    }

    #[test]
    fn bare_domain_is_accepted_and_junk_is_not() {
        assert_eq!(
            domain_for("new1.pure.cloud").as_deref(),
            Some("new1.pure.cloud")
        );
        assert_eq!(domain_for("us-east-9"), None);
        assert_eq!(domain_for("bad..domain"), None);
        assert_eq!(domain_for("evil.com/path"), None);
    }

    #[test]
    fn urls_swap_api_for_login() {
        let (login, api) = urls_for("mypurecloud.ie");
        assert_eq!(login, "https://login.mypurecloud.ie");
        assert_eq!(api, "https://api.mypurecloud.ie");
    }
}
