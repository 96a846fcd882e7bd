//! Reading virtgate's table back: the generation, chains, rules, sets and their elements
//! with counters, as netlink dumps.

use std::io;

use super::{
    NFT_MSG_GETCHAIN, NFT_MSG_GETGEN, NFT_MSG_GETRULE, NFT_MSG_GETSET, NFT_MSG_GETSETELEM,
    NFT_MSG_GETTABLE, attr, attrs, be64, cstr, request,
};

/// The ruleset generation of this network namespace: the kernel adds one for every
/// nf_tables transaction it commits (any table, `nft` and iptables-nft alike), so an
/// unchanged generation means an unchanged ruleset.
pub fn generation() -> io::Result<u32> {
    // AF_UNSPEC; the answer holds NFTA_GEN_ID = 1, big-endian
    let answers = request(NFT_MSG_GETGEN, 0, false, &[])?.unwrap_or_default();
    answers
        .iter()
        .find_map(|m| attr(m, 1))
        .and_then(|b| b.get(..4))
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| io::Error::other("nf_tables answered without a generation"))
}

/// Whether a table exists.
pub fn table_exists(family: u8, table: &str) -> io::Result<bool> {
    // NFTA_TABLE_NAME = 1
    Ok(request(NFT_MSG_GETTABLE, family, false, &[(1, table)])?.is_some_and(|m| !m.is_empty()))
}

/// A rule as listed: its handle and its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub chain: String,
    pub handle: u64,
    pub comment: Option<String>,
    /// Output interfaces the rule matches (`oif` resolved to its name, or `oifname`).
    pub oifs: Vec<String>,
}

/// Interfaces compared after a `meta oif` / `meta oifname` load in a rule's expressions.
pub(super) fn rule_oifs(exprs: &[u8]) -> Vec<String> {
    // NFTA_LIST_ELEM 1 { NFTA_EXPR_NAME 1, NFTA_EXPR_DATA 2 }; meta: NFTA_META_KEY 2
    // (NFT_META_OIF 5, NFT_META_OIFNAME 7); cmp: NFTA_CMP_DATA 3 { NFTA_DATA_VALUE 1 }
    let mut out = Vec::new();
    let mut pending: Option<u32> = None;
    for e in attrs(exprs).filter(|a| a.kind == 1) {
        let name = attr(e.data, 1).map(cstr).unwrap_or_default();
        let data = attr(e.data, 2).unwrap_or_default();
        match name.as_str() {
            "meta" => {
                pending = attr(data, 2)
                    .and_then(|k| k.get(..4))
                    .map(|k| u32::from_be_bytes([k[0], k[1], k[2], k[3]]))
                    .filter(|k| *k == 5 || *k == 7);
            }
            "cmp" => {
                if let Some(key) = pending.take() {
                    let v = attr(data, 3).and_then(|d| attr(d, 1)).unwrap_or_default();
                    if key == 7 {
                        out.push(cstr(v));
                    } else if let Some(b) = v.get(..4) {
                        let idx = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
                        if let Ok(n) = nix::net::if_::if_indextoname(idx) {
                            out.push(n.to_string_lossy().into_owned());
                        }
                    }
                }
            }
            _ => pending = None,
        }
    }
    out
}

pub(super) fn rule_info(m: &[u8]) -> RuleInfo {
    // NFTA_RULE_CHAIN 2, NFTA_RULE_HANDLE 3, NFTA_RULE_USERDATA 7
    let comment = attr(m, 7).and_then(|ud| {
        // TLVs: type u8 (0 = comment), len u8, value
        let mut i = 0;
        while i + 2 <= ud.len() {
            let (t, l) = (ud[i], ud[i + 1] as usize);
            let v = ud.get(i + 2..i + 2 + l)?;
            if t == 0 {
                return Some(cstr(v));
            }
            i += 2 + l;
        }
        None
    });
    RuleInfo {
        chain: attr(m, 2).map(cstr).unwrap_or_default(),
        handle: attr(m, 3).map(be64).unwrap_or(0),
        comment,
        oifs: attr(m, 4).map(rule_oifs).unwrap_or_default(),
    }
}

/// The rules of one chain (or of the whole table when `chain` is None), in order; None if
/// the table or chain does not exist.
pub fn rules(family: u8, table: &str, chain: Option<&str>) -> io::Result<Option<Vec<RuleInfo>>> {
    let mut a = vec![(1, table)];
    if let Some(c) = chain {
        a.push((2, c));
    }
    Ok(request(NFT_MSG_GETRULE, family, true, &a)?
        .map(|msgs| msgs.iter().map(|m| rule_info(m)).collect()))
}

/// Names of the chains (or sets) of a table; None if the table does not exist.
pub(super) fn names(msg: u16, family: u8, table: &str) -> io::Result<Option<Vec<String>>> {
    let Some(msgs) = request(msg, family, true, &[(1, table)])? else {
        return Ok(None);
    };
    // NFTA_CHAIN_TABLE / NFTA_SET_TABLE = 1, NFTA_CHAIN_NAME / NFTA_SET_NAME = 3 / 2
    let name_attr = if msg == NFT_MSG_GETCHAIN { 3 } else { 2 };
    Ok(Some(
        msgs.iter()
            .filter(|m| attr(m, 1).map(cstr).as_deref() == Some(table))
            .filter_map(|m| attr(m, name_attr).map(cstr))
            .collect(),
    ))
}

pub fn chains(family: u8, table: &str) -> io::Result<Option<Vec<String>>> {
    names(NFT_MSG_GETCHAIN, family, table)
}

pub fn sets(family: u8, table: &str) -> io::Result<Option<Vec<String>>> {
    names(NFT_MSG_GETSET, family, table)
}

/// One set element as the kernel holds it: canonical bytes of key, key end (= key for
/// non-interval sets) and data, plus its counter if the set counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawElem {
    pub key: Vec<u8>,
    pub data: Vec<u8>,
    pub counter: Option<(u64, u64)>,
}

/// Canonical bytes of a verdict (`goto CHAIN`), as [`RawElem::data`] holds it.
pub fn verdict_bytes(code: i32, chain: &str) -> Vec<u8> {
    let mut v = code.to_be_bytes().to_vec();
    v.extend_from_slice(chain.as_bytes());
    v
}

pub(super) fn data_value(d: &[u8]) -> Vec<u8> {
    // NFTA_DATA_VALUE 1, NFTA_DATA_VERDICT 2 { NFTA_VERDICT_CODE 1, NFTA_VERDICT_CHAIN 2 }
    if let Some(v) = attr(d, 1) {
        return v.to_vec();
    }
    if let Some(v) = attr(d, 2) {
        let code = attr(v, 1)
            .and_then(|c| c.get(..4))
            .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .unwrap_or(0);
        return verdict_bytes(code, &attr(v, 2).map(cstr).unwrap_or_default());
    }
    Vec::new()
}

pub(super) fn counter_of(expr: &[u8]) -> Option<(u64, u64)> {
    // NFTA_EXPR_NAME 1, NFTA_EXPR_DATA 2 { NFTA_COUNTER_BYTES 1, NFTA_COUNTER_PACKETS 2 }
    if attr(expr, 1).map(cstr).as_deref() != Some("counter") {
        return None;
    }
    let d = attr(expr, 2)?;
    Some((attr(d, 2).map(be64)?, attr(d, 1).map(be64)?))
}

/// The elements of one set; None if the set does not exist.
pub fn elements(family: u8, table: &str, set: &str) -> io::Result<Option<Vec<RawElem>>> {
    let Some(msgs) = request(NFT_MSG_GETSETELEM, family, true, &[(1, table), (2, set)])? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for m in &msgs {
        // NFTA_SET_ELEM_LIST_ELEMENTS 3 -> NFTA_LIST_ELEM 1 -> element attributes
        let Some(list) = attr(m, 3) else { continue };
        for e in attrs(list).filter(|a| a.kind == 1) {
            let mut key = Vec::new();
            let mut key_end = None;
            let mut data = Vec::new();
            let mut counter = None;
            for a in attrs(e.data) {
                match a.kind {
                    1 => key = data_value(a.data),
                    2 => data = data_value(a.data),
                    // NFTA_SET_ELEM_KEY_END 10, _EXPR 7, _EXPRESSIONS 11
                    10 => key_end = Some(data_value(a.data)),
                    7 => counter = counter.or(counter_of(a.data)),
                    11 => {
                        for x in attrs(a.data).filter(|x| x.kind == 1) {
                            counter = counter.or(counter_of(x.data));
                        }
                    }
                    _ => {}
                }
            }
            let end = key_end.unwrap_or_else(|| key.clone());
            key.extend_from_slice(&end);
            out.push(RawElem { key, data, counter });
        }
    }
    Ok(Some(out))
}
