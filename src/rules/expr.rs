//! The condition language shared by rule kinds.
//!
//! ```text
//! expr    := and ("or" and)*
//! and     := unary ("and" unary)*
//! unary   := "not" unary | "(" expr ")" | compare
//! compare := operand op number        op: < <= > >= == !=
//! operand := vital | agg "(" vital ")" agg: avg min max count sum delta
//! ```
//! Threshold rules compare a reading's vital (`hr > 120 or hr < 40`); window rules compare
//! aggregates of one vital over the window (`avg(spo2) < 90`).

use crate::model::Vital;
use std::fmt;

/// An aggregate of one vital over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Agg {
    Avg,
    Min,
    Max,
    Count,
    Sum,
    /// Last value minus first value, by event time.
    Delta,
}

impl Agg {
    fn from_name(name: &str) -> Option<Agg> {
        Some(match name {
            "avg" => Agg::Avg,
            "min" => Agg::Min,
            "max" => Agg::Max,
            "count" => Agg::Count,
            "sum" => Agg::Sum,
            "delta" => Agg::Delta,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Agg::Avg => "avg",
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Count => "count",
            Agg::Sum => "sum",
            Agg::Delta => "delta",
        }
    }
}

/// What a comparison reads: a vital of the reading, or an aggregate of it over the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Operand {
    Vital(Vital),
    Agg(Agg, Vital),
}

impl Operand {
    pub fn vital(self) -> Vital {
        match self {
            Operand::Vital(v) | Operand::Agg(_, v) => v,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CmpOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CmpOp {
    fn apply(self, a: f64, b: f64) -> bool {
        match self {
            CmpOp::Lt => a < b,
            CmpOp::Le => a <= b,
            CmpOp::Gt => a > b,
            CmpOp::Ge => a >= b,
            CmpOp::Eq => a == b,
            CmpOp::Ne => a != b,
        }
    }

    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
        }
    }
}

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Cmp(Operand, CmpOp, f64),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
}

impl Expr {
    /// Evaluates with `value` supplying each operand; a missing operand makes its
    /// comparison false.
    pub fn eval(&self, value: &impl Fn(Operand) -> Option<f64>) -> bool {
        match self {
            Expr::Cmp(operand, op, rhs) => value(*operand).is_some_and(|v| op.apply(v, *rhs)),
            Expr::And(a, b) => a.eval(value) && b.eval(value),
            Expr::Or(a, b) => a.eval(value) || b.eval(value),
            Expr::Not(a) => !a.eval(value),
        }
    }

    /// The leftmost operand: the value an alert reports.
    pub fn first_operand(&self) -> Operand {
        match self {
            Expr::Cmp(o, _, _) => *o,
            Expr::And(a, _) | Expr::Or(a, _) | Expr::Not(a) => a.first_operand(),
        }
    }

    /// Every operand the condition reads.
    pub fn operands(&self) -> Vec<Operand> {
        let mut out = Vec::new();
        self.visit(&mut |o| out.push(o));
        out
    }

    fn visit(&self, f: &mut impl FnMut(Operand)) {
        match self {
            Expr::Cmp(o, _, _) => f(*o),
            Expr::And(a, b) | Expr::Or(a, b) => {
                a.visit(f);
                b.visit(f);
            }
            Expr::Not(a) => a.visit(f),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Cmp(Operand::Vital(v), op, n) => write!(f, "{} {} {n}", v.name(), op.symbol()),
            Expr::Cmp(Operand::Agg(a, v), op, n) => {
                write!(f, "{}({}) {} {n}", a.name(), v.name(), op.symbol())
            }
            Expr::And(a, b) => write!(f, "({a} and {b})"),
            Expr::Or(a, b) => write!(f, "({a} or {b})"),
            Expr::Not(a) => write!(f, "not {a}"),
        }
    }
}

/// A condition that failed to parse, with the byte offset of the problem.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} at position {position}")]
pub struct ExprError {
    pub message: String,
    pub position: usize,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Number(f64),
    Op(CmpOp),
    Open,
    Close,
}

fn tokenize(src: &str) -> Result<Vec<(usize, Token)>, ExprError> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        let token = match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'(' => {
                i += 1;
                Token::Open
            }
            b')' => {
                i += 1;
                Token::Close
            }
            b'<' | b'>' | b'=' | b'!' => {
                let two = bytes.get(i + 1) == Some(&b'=');
                i += if two { 2 } else { 1 };
                Token::Op(match (c, two) {
                    (b'<', false) => CmpOp::Lt,
                    (b'<', true) => CmpOp::Le,
                    (b'>', false) => CmpOp::Gt,
                    (b'>', true) => CmpOp::Ge,
                    (b'=', true) => CmpOp::Eq,
                    (b'!', true) => CmpOp::Ne,
                    _ => return Err(err(start, "expected one of < <= > >= == !=")),
                })
            }
            b'0'..=b'9' | b'-' | b'.' => {
                i += 1;
                while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'.' | b'e' | b'E') {
                    i += 1;
                }
                let text = &src[start..i];
                let n: f64 = text
                    .parse()
                    .map_err(|_| err(start, &format!("bad number `{text}`")))?;
                if !n.is_finite() {
                    return Err(err(start, "number must be finite"));
                }
                Token::Number(n)
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                Token::Word(src[start..i].to_ascii_lowercase())
            }
            _ => return Err(err(start, &format!("unexpected character `{}`", c as char))),
        };
        out.push((start, token));
    }
    Ok(out)
}

fn err(position: usize, message: &str) -> ExprError {
    ExprError {
        message: message.to_string(),
        position,
    }
}

struct ExprParser {
    tokens: Vec<(usize, Token)>,
    pos: usize,
    end: usize,
}

impl ExprParser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).map(|(_, t)| t)
    }

    fn at(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |(p, _)| *p)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).map(|(_, t)| t.clone());
        self.pos += 1;
        t
    }

    fn eat_word(&mut self, word: &str) -> bool {
        if matches!(self.peek(), Some(Token::Word(w)) if w == word) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.and()?;
        while self.eat_word("or") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut left = self.unary()?;
        while self.eat_word("and") {
            left = Expr::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, ExprError> {
        if self.eat_word("not") {
            return Ok(Expr::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Token::Open) {
            self.pos += 1;
            let inner = self.expr()?;
            let at = self.at();
            return match self.next() {
                Some(Token::Close) => Ok(inner),
                _ => Err(err(at, "expected `)`")),
            };
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Expr, ExprError> {
        let operand = self.operand()?;
        let at = self.at();
        let Some(Token::Op(op)) = self.next() else {
            return Err(err(at, "expected a comparison (< <= > >= == !=)"));
        };
        let at = self.at();
        let Some(Token::Number(n)) = self.next() else {
            return Err(err(at, "expected a number"));
        };
        Ok(Expr::Cmp(operand, op, n))
    }

    fn operand(&mut self) -> Result<Operand, ExprError> {
        let at = self.at();
        let Some(Token::Word(word)) = self.next() else {
            return Err(err(
                at,
                "expected a vital (hr, spo2, temp, sys_bp, dia_bp, rr) or an aggregate",
            ));
        };
        if let Some(vital) = Vital::from_name(&word) {
            return Ok(Operand::Vital(vital));
        }
        let Some(agg) = Agg::from_name(&word) else {
            return Err(err(at, &format!("unknown name `{word}`")));
        };
        let open_at = self.at();
        if self.next() != Some(Token::Open) {
            return Err(err(open_at, &format!("expected `(` after `{word}`")));
        }
        let vital_at = self.at();
        let vital = match self.next() {
            Some(Token::Word(w)) => Vital::from_name(&w)
                .ok_or_else(|| err(vital_at, &format!("unknown vital `{w}`")))?,
            _ => return Err(err(vital_at, "expected a vital")),
        };
        let close_at = self.at();
        if self.next() != Some(Token::Close) {
            return Err(err(close_at, "expected `)`"));
        }
        Ok(Operand::Agg(agg, vital))
    }
}

/// Parses a condition.
pub fn parse(src: &str) -> Result<Expr, ExprError> {
    let tokens = tokenize(src)?;
    if tokens.is_empty() {
        return Err(err(0, "empty condition"));
    }
    let mut parser = ExprParser {
        tokens,
        pos: 0,
        end: src.len(),
    };
    let expr = parser.expr()?;
    if parser.pos < parser.tokens.len() {
        return Err(err(parser.at(), "unexpected text after the condition"));
    }
    Ok(expr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval_hr(src: &str, hr: f64) -> bool {
        parse(src).unwrap().eval(&|o| match o {
            Operand::Vital(Vital::Hr) => Some(hr),
            _ => None,
        })
    }

    #[test]
    fn precedence_and_parentheses() {
        assert!(eval_hr("hr > 120 or hr < 40", 130.0));
        assert!(eval_hr("hr > 120 or hr < 40", 39.0));
        assert!(!eval_hr("hr > 120 or hr < 40", 120.0));
        assert!(eval_hr("hr >= 40 and hr <= 120", 120.0));
        assert!(!eval_hr("not (hr >= 40 and hr <= 120)", 80.0));
        // and binds tighter than or
        assert!(eval_hr("hr < 0 and hr > 1 or hr == 5", 5.0));
        assert!(!eval_hr("hr < 0 and (hr > 1 or hr == 5)", 5.0));
    }

    #[test]
    fn aggregates_parse() {
        let e = parse("avg(spo2) < 90 or min(spo2) <= 85.5").unwrap();
        assert_eq!(
            e.operands(),
            vec![
                Operand::Agg(Agg::Avg, Vital::Spo2),
                Operand::Agg(Agg::Min, Vital::Spo2)
            ]
        );
    }

    #[test]
    fn errors_name_the_position() {
        let e = parse("hr >> 3").unwrap_err();
        assert_eq!(e.position, 4);
        assert_eq!(parse("pulse > 3").unwrap_err().position, 0);
        assert_eq!(parse("hr > 3 and").unwrap_err().position, 10);
        assert_eq!(parse("avg(foo) > 3").unwrap_err().position, 4);
        assert!(parse("").is_err());
        assert!(parse("hr > 3 hr").is_err());
    }

    #[test]
    fn missing_operand_is_false() {
        let e = parse("hr > 1").unwrap();
        assert!(!e.eval(&|_| None));
        let e = parse("not hr > 1").unwrap();
        assert!(e.eval(&|_| None));
    }
}
