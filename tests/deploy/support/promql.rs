//! PromQL references, by hand: the metric selectors (with their label
//! matchers) and the grouping labels of an expression. The expressions checked
//! are not all PromQL: the dashboard's use Grafana variables (`$job`, ranges of
//! `[$__rate_interval]`) and `label_values(selector, label)` queries, which a
//! real PromQL parser (the `promql-parser` crate) rejects; and only references
//! are needed, not an evaluable syntax tree. So this small tokenizer stays.

use std::collections::BTreeSet;

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Punct(char),
}

/// PromQL tokens; numbers, durations and Grafana variables ($job,
/// $__rate_interval) are dropped.
fn promql_tokens(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '"' || c == '\'' || c == '`' {
            let mut value = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
            i += 1;
            tokens.push(Token::Str(value));
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (word(chars[i]) || chars[i] == '{' || chars[i] == '}') {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (word(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && word(chars[i]) {
                i += 1;
            }
            tokens.push(Token::Ident(chars[start..i].iter().collect()));
        } else {
            tokens.push(Token::Punct(c));
            i += 1;
        }
    }
    tokens
}

/// A metric selector in an expression: `name{label op "value", ...}`.
#[derive(Debug)]
pub struct Selector {
    pub metric: String,
    pub matchers: Vec<(String, String, String)>,
}

/// The metric selectors of a PromQL expression, and the label names it groups
/// or matches on (by, without, on, ignoring, group_left, group_right).
pub fn promql_references(expr: &str) -> (Vec<Selector>, BTreeSet<String>) {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 20] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
        "limitk",
    ];
    let tokens = promql_tokens(expr);
    let mut selectors = Vec::new();
    let mut grouping = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        let Token::Ident(name) = &tokens[i] else {
            i += 1;
            continue;
        };
        let next = tokens.get(i + 1);
        if GROUPING.contains(&name.as_str()) && next == Some(&Token::Punct('(')) {
            i += 2;
            while i < tokens.len() && tokens[i] != Token::Punct(')') {
                if let Token::Ident(label) = &tokens[i] {
                    grouping.insert(label.clone());
                }
                i += 1;
            }
        } else if next == Some(&Token::Punct('('))
            || KEYWORDS.contains(&name.as_str())
            || GROUPING.contains(&name.as_str())
        {
            i += 1;
        } else {
            let mut selector = Selector {
                metric: name.clone(),
                matchers: Vec::new(),
            };
            i += 1;
            if tokens.get(i) == Some(&Token::Punct('{')) {
                i += 1;
                while i < tokens.len() && tokens[i] != Token::Punct('}') {
                    let Token::Ident(label) = &tokens[i] else {
                        i += 1;
                        continue;
                    };
                    let mut op = String::new();
                    i += 1;
                    while let Some(Token::Punct(p)) = tokens.get(i) {
                        if !matches!(p, '=' | '!' | '~') {
                            break;
                        }
                        op.push(*p);
                        i += 1;
                    }
                    let Some(Token::Str(value)) = tokens.get(i) else {
                        panic!("matcher {label}{op} without a quoted value in {expr}");
                    };
                    selector.matchers.push((label.clone(), op, value.clone()));
                    i += 1;
                }
            }
            selectors.push(selector);
        }
    }
    (selectors, grouping)
}
